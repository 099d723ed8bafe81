"""Official LSeg weights (PyTorch Lightning .ckpt or bare state dict) -> segcli's LSeg: the LSeg
family's foreign-weights hook (segcli.models.families), key by key (segcli.models.lseg_format).

Reading never runs code from the file (see segcli/models/weights.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from segcli.errors import SegcliError
from segcli.modeling.configs import ARCHITECTURES, LSegConfig, TextConfig
from segcli.modeling.lseg import LSeg, model_from_state_dict
from segcli.models.lseg_format import lseg_to_segcli_key
from segcli.models.weights import read_state_dict
from segcli.vocabulary.labels import LabelSet, named_label_set


def strip_lightning_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LSeg's Lightning module holds the network as `net`: drop that "net." prefix."""
    return {(k[4:] if k.startswith("net.") else k): v for k, v in state.items()}


def is_lseg_state_dict(state: dict[str, torch.Tensor]) -> bool:
    """True for an LSegNet state dict (without the "net." prefix)."""
    return "pretrained.model.patch_embed.proj.weight" in state


def read_lseg_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The model weights of an LSeg .ckpt (keys without the Lightning "net." prefix), read safely."""
    return strip_lightning_prefix(read_state_dict(path))


def infer_config(state: dict[str, torch.Tensor]) -> LSegConfig:
    """The architecture, read off the weights' shapes (LSeg's head size is always 64)."""
    try:
        patch = state["pretrained.model.patch_embed.proj.weight"]
        vit_dim, patch_size = patch.shape[0], patch.shape[-1]
        depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"pretrained\.model\.blocks\.(\d+)\.", k)))
        grid = round((state["pretrained.model.pos_embed"].shape[1] - 1) ** 0.5)
        channels = tuple(state[f"pretrained.act_postprocess{i}.3.weight"].shape[0] for i in range(1, 5))
        features = state["scratch.layer1_rn.weight"].shape[0]
        width = state["clip_pretrained.token_embedding.weight"].shape[1]
        text = TextConfig(
            width=width, heads=max(1, width // 64),
            layers=1 + max(int(m.group(1)) for k in state
                           if (m := re.match(r"clip_pretrained\.transformer\.resblocks\.(\d+)\.", k))),
            context_length=state["clip_pretrained.positional_embedding"].shape[0],
            vocab_size=state["clip_pretrained.token_embedding.weight"].shape[0],
            embed_dim=state["clip_pretrained.text_projection"].shape[1],
        )
    except (KeyError, ValueError) as exc:
        raise SegcliError(f"not an LSeg (LSegNet, DPT) state dict: missing {exc}") from None
    step = depth // 4
    fields = dict(patch_size=patch_size, vit_dim=vit_dim, depth=depth, num_heads=max(1, vit_dim // 64),
                  hook_blocks=tuple(step * (i + 1) - 1 for i in range(4)), reassemble_channels=channels,
                  features=features, pos_embed_grid=grid, text=text)
    for cfg in ARCHITECTURES.values():
        if all(getattr(cfg, k) == v for k, v in fields.items()):
            return cfg
    return LSegConfig(name="lseg_custom", timm_name=None, clip_name=None, **fields)


def lseg_to_segcli(state: dict[str, torch.Tensor]) -> LSeg:
    """Build the segcli model holding exactly these weights; every key and shape is checked."""
    cfg = infer_config(state)
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        try:
            target = lseg_to_segcli_key(key)
        except KeyError as exc:
            raise SegcliError(str(exc).strip("'\"")) from None
        if target is not None:
            # CLIP weights are stored fp16 by LSeg; segcli keeps everything fp32 (ints stay ints)
            mapped[target] = value.float() if value.is_floating_point() else value
    with torch.device("meta"):
        expected = LSeg(cfg).state_dict()
    missing = sorted(set(expected) - set(mapped))
    if missing:
        raise SegcliError(f"LSeg checkpoint lacks {len(missing)} weights, e.g. {missing[0]}")
    wrong = [k for k in expected if tuple(expected[k].shape) != tuple(mapped[k].shape)]
    if wrong:
        k = wrong[0]
        raise SegcliError(f"shape mismatch for {k}: checkpoint {tuple(mapped[k].shape)}, model {tuple(expected[k].shape)}")
    return model_from_state_dict(cfg, mapped)


def lseg_from_foreign(state: dict[str, torch.Tensor], name: str) -> tuple[LSeg, LabelSet] | None:
    """The family table's foreign-weights hook: an official LSeg state dict -> (LSeg, the ADE20K
    labels it was trained on); None for other weights."""
    state = strip_lightning_prefix(state)
    if not is_lseg_state_dict(state):
        return None
    return lseg_to_segcli(state), named_label_set("ade20k")
