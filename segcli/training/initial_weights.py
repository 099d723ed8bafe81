"""Where a training run starts: an architecture with pretrained parts (the ViT from timm, the CLIP text
tower from open_clip; from the hub or local files), or a segcli checkpoint to fine-tune."""

from __future__ import annotations

import dataclasses

import torch

from segcli.errors import SegcliError, mismatch_detail
from segcli.modeling.lseg import LSeg, build_model
from segcli.models.factory import ModelSpec, load_model
from segcli.models.weights import read_state_dict
from segcli.training.options import TrainOptions


def initial_model(opts: TrainOptions, spec: "ModelSpec") -> LSeg:
    """An architecture with pretrained backbone/text weights (hub or files), or a checkpoint to
    fine-tune. Its config's input size is the crop: the checkpoint remembers the evaluation size,
    so predict and eval reproduce validation."""
    if spec.kind == "checkpoint":
        loaded = load_model(spec, torch.device("cpu")).backend
        model = build_model(dataclasses.replace(loaded.cfg, default_imgsz=opts.crop))
        model.load_state_dict(loaded.state_dict(), strict=True)
        return model
    torch.manual_seed(opts.seed)
    model = build_model(dataclasses.replace(spec.config, default_imgsz=opts.crop))
    cfg = model.cfg
    backbone = _backbone_state(cfg, opts)
    if backbone is not None:
        _load_backbone(model, backbone)
    text = _text_state(cfg, opts)
    if text is not None:
        try:
            model.text_encoder.tower.load_state_dict(text, strict=True)
        except RuntimeError as exc:
            raise SegcliError(f"the text weights do not fit {cfg.name}'s CLIP text tower ({mismatch_detail(exc)})") from None
    return model


def _backbone_state(cfg, opts: TrainOptions) -> dict | None:
    if opts.backbone_weights:
        return read_state_dict(opts.backbone_weights)
    if not cfg.timm_name or not opts.pretrained:
        return None
    import timm

    from segcli.models.hub import hub_file

    repo = timm.models.get_pretrained_cfg(cfg.timm_name).hf_hub_id
    path = hub_file(repo, ["model.safetensors", "pytorch_model.bin"], f"the pretrained {cfg.timm_name} backbone",
                    "pass --backbone-weights FILE (a timm ViT state dict), or --no-pretrained to start from random weights")
    return read_state_dict(path)


def _load_backbone(model: LSeg, state: dict) -> None:
    from timm.layers import resample_abs_pos_embed

    vit = model.image_encoder.vit
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "norm.", "fc_norm."))}
    if "pos_embed" in state and state["pos_embed"].shape != vit.pos_embed.shape:
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(vit.patch_embed.grid_size), num_prefix_tokens=1)
    missing, unexpected = vit.load_state_dict(state, strict=False)
    missing = [k for k in missing if k in dict(vit.named_parameters())]
    if missing or unexpected:
        raise SegcliError(f"backbone weights do not fit {model.cfg.name}: "
                          f"{len(missing)} missing (e.g. {missing[:1]}), {len(unexpected)} unexpected (e.g. {unexpected[:1]})")


def _text_state(cfg, opts: TrainOptions) -> dict | None:
    from segcli.models.clip_weights import clip_text_state, download_clip_weights

    if opts.text_weights:
        return clip_text_state(read_state_dict(opts.text_weights))
    if cfg.clip_name and opts.pretrained:
        return clip_text_state(read_state_dict(download_clip_weights(cfg.clip_name, "openai")))
    return None
