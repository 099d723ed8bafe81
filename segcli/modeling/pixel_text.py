"""The seam every segcli model shares: pixel embeddings in CLIP text space, scored against labels."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from segcli.modeling.backend import Capabilities
from segcli.vocabulary.labels import LabelSet, prompt_templates


class PixelTextModel(nn.Module):
    """Base of every PyTorch family (LSeg, CLIPDense); implements `segcli.modeling.backend.DenseBackend`.

    Subclasses build `text_encoder`, set `output_stride` and implement
    `pixel_embeddings(images [B,3,H,W] in [0,1]) -> [B,C,H/s,W/s]` (s = output_stride).
    """

    output_stride: int
    text_encoder: nn.Module
    default_prompt: str | None = None  # the template labels go through when the user gives none
    # the DenseBackend facts every PyTorch family shares
    open_vocabulary = True
    baked_labels = None
    fixed_imgsz = None
    region_generator: nn.Module | None = None
    quantized = False  # quantize_int8 ran: the image branch no longer exports

    @property
    def architecture(self) -> str:
        return self.cfg.name

    @property
    def capabilities(self) -> Capabilities:
        """What this model can do (segcli.modeling.backend.Capabilities): the family's, less export once
        quantised."""
        own = self.family_capabilities()
        return replace(own, exportable=False, limits=own.limits or "quantised to int8") if self.quantized else own

    def family_capabilities(self) -> Capabilities:
        """A family's own capabilities; a subclass that can do less or more says so here."""
        return Capabilities(family=self.cfg.family, int8=True)

    @property
    def default_imgsz(self) -> int:
        return self.cfg.default_imgsz

    @property
    def input_multiple(self) -> int:
        return self.cfg.input_multiple

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.logit_scale = cfg.logit_scale
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(1, 3, 1, 1), persistent=False)
        self._label_cache: dict[tuple, torch.Tensor] = {}

    def pixel_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rebuild_buffers(self, device: str | torch.device) -> None:
        """The buffers a state dict does not hold (built on the meta device, then adopted weights):
        made again from the config on `device`."""
        self.pixel_mean = torch.tensor(self.cfg.pixel_mean, device=device).view(1, 3, 1, 1)
        self.pixel_std = torch.tensor(self.cfg.pixel_std, device=device).view(1, 3, 1, 1)
        self.text_encoder.tower.attn_mask = self.text_encoder.tower.build_causal_mask().to(device)

    def logits(self, pixel_embeddings: torch.Tensor, label_embeddings: torch.Tensor) -> torch.Tensor:
        """[B,C,h,w] x [K,C] (normalised) -> scaled cosine similarities [B,K,h,w] in fp32."""
        pixels = F.normalize(pixel_embeddings.float(), dim=1)
        return torch.einsum("bchw,kc->bkhw", pixels, label_embeddings.float()) * self.logit_scale

    def image_logits(self, pixel_embeddings: torch.Tensor, label_embeddings: torch.Tensor) -> torch.Tensor:
        """One image: [C,h,w] x [K,C] (normalised) -> [K,h,w] fp32, the same numbers as `logits`
        up to rounding. Scored alone, an image's logits do not depend on the batch it came in, so
        stored embeddings (segcli relabel) reproduce them bit for bit on the same device.

        The cells are scored as rows [h*w, C] (the decoders' channels-last layout: no copy, and the
        norm is a contiguous reduction), and divided by their norm after the product: K divisions
        per cell instead of C."""
        c, h, w = pixel_embeddings.shape
        cells = pixel_embeddings.permute(1, 2, 0).float().contiguous().view(h * w, c)
        norms = torch.linalg.vector_norm(cells, dim=1, keepdim=True).clamp_min_(1e-12)
        scores = (cells @ label_embeddings.float().T).div_(norms).mul_(self.logit_scale)  # [h*w, K]
        return scores.T.reshape(-1, h, w)

    def quantize_int8(self) -> None:
        """Dynamic int8 for the image branch's linear layers (CPU inference, `--precision int8`): weights
        stored int8, activations quantised per batch, outputs fp32. The text tower stays as it is
        (it runs once per label set); convolutions and attention products stay fp32."""
        import warnings

        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():  # torch's quantised tensors announce their move to torchao
            warnings.simplefilter("ignore")
            for name, child in self.named_children():
                if name != "text_encoder":
                    quantize_dynamic(child, {nn.Linear}, dtype=torch.qint8, inplace=True)
        self.quantized = True  # quantised modules do not export to ONNX/.pt2

    def dense_logits(self, images: torch.Tensor, label_embeddings: torch.Tensor, autocast_dtype: torch.dtype | None = None,
                     return_embeddings: bool = False, regions: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[B,3,H,W] in [0,1] -> (logits [B,K,H/s,W/s] fp32, pixel embeddings [B,C,H/s,W/s] or None).
        `regions` [B,H,W]: the inputs' region ids, for a model whose capabilities say `needs_regions` (corrclip).

        Only the image branch runs under autocast; the scoring stays in fp32, one image at a time.
        """
        with torch.autocast(images.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            emb = self.pixel_embeddings(images) if regions is None else self.pixel_embeddings(images, regions)
        return self.score(emb, label_embeddings, return_embeddings)

    def score(self, pixel_embeddings: torch.Tensor, label_embeddings: torch.Tensor, return_embeddings: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pixel embeddings [B,C,h,w] x labels [K,C] -> (logits [B,K,h,w] fp32, the embeddings in fp32
        or None): each image scored alone (`image_logits`)."""
        text = label_embeddings.to(pixel_embeddings.device)
        logits = torch.stack([self.image_logits(one, text) for one in pixel_embeddings])
        return logits, (pixel_embeddings.float() if return_embeddings else None)

    def label_embeddings(self, labels: LabelSet, prompt: str | None = None) -> torch.Tensor:
        """[K,C] L2-normalised; synonyms are averaged. Computed once per (labels, prompt), then cached."""
        key = (labels.synonyms, prompt)
        cached = self._label_cache.get(key)
        if cached is None:
            cached = self._label_cache[key] = embed_labels(self.text_encoder, labels, prompt)
        return cached

    def _load_from_state_dict(self, *args, **kwargs):
        self._label_cache.clear()  # new text weights make cached label embeddings stale
        super()._load_from_state_dict(*args, **kwargs)


def embed_labels(text_encoder: nn.Module, labels: LabelSet, prompt: str | None = None) -> torch.Tensor:
    """[K,C] L2-normalised: each label's synonyms (through `prompt`) encoded and averaged. A named
    prompt set ("imagenet80") is an ensemble, built as CLIP's zero-shot classifier is: each word
    through every template, the normalised embeddings averaged and normalised again."""
    words = [word for syn in labels.synonyms for word in syn]
    templates = prompt_templates(prompt)
    if len(templates) == 1:
        flat = text_encoder([templates[0].format(w) if templates[0] else w for w in words])
    else:  # one template at a time: memory stays one batch of words, whatever the set's size
        total = sum(F.normalize(text_encoder([t.format(w) for w in words]), dim=-1) for t in templates)
        flat = F.normalize(total / len(templates), dim=-1)
    rows, start = [], 0
    for syn in labels.synonyms:
        rows.append(flat[start:start + len(syn)].mean(0))
        start += len(syn)
    return F.normalize(torch.stack(rows), dim=-1)


def build_from_state_dict(model_cls: type[PixelTextModel], cfg, state: dict[str, torch.Tensor],
                          device: str | torch.device = "cpu") -> PixelTextModel:
    """Build on the meta device and adopt `state` as the weights (strict; no random init, no copy).

    Raises RuntimeError when keys or shapes do not match `cfg`.
    """
    with torch.device("meta"):
        model = model_cls(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    model.rebuild_buffers(device)
    return model.eval()
