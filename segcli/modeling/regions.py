"""Class-agnostic region masks for corrclip: a panoptic model's segments as one id per pixel.

CorrCLIP (segcli.modeling.corrclip) restricts attention to regions and votes in them; any panoptic
segmenter can make them, its classes ignored. Two run through transformers (an optional
dependency: `pip install 'segcli[regions]'`), with the settings the CorrCLIP authors use:

- eomt (default): EoMT-L trained on COCO panoptic at 640 (`tue-mps/coco_panoptic_eomt_large_640`),
  segments kept at score > 0.8 and overlap 0.8, COCO's 53 stuff classes fused into one segment each.
- mask2former: Mask2Former Swin-L on COCO panoptic, transformers' default panoptic post-processing.
- sam2: SAM 2 Hiera-L's automatic masks (transformers' mask-generation pipeline) from 8 x 8 points,
  predicted IoU and stability at least 0.4 (the authors' SAM2AutomaticMaskGenerator settings), the
  masks laid smallest first so a larger one covers a smaller one, as their code lays them. Unlike
  their generator, the pipeline keeps SAM's three masks per point (multimask output) before its
  filtering and non-maximum suppression.

Ids: -1 (EoMT) or 0 (Mask2Former, SAM 2) where no segment lies, then one id per segment; corrclip
reads the smallest id of a photo as "unsegmented", as the authors' code does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from segcli.errors import SegcliError


@dataclass(frozen=True)
class RegionSource:
    """Where a generator's weights live and how its panoptic output is cut into segments."""

    repo: str
    model_type: str  # transformers' config.json `model_type`
    settings: dict = field(default_factory=dict)  # keyword arguments of post_process_panoptic_segmentation


COCO_STUFF_CLASSES = list(range(80, 133))  # COCO panoptic's 133 classes: 80 things, then 53 stuff
GENERATORS = {
    "eomt": RegionSource("tue-mps/coco_panoptic_eomt_large_640", "eomt",
                         {"threshold": 0.8, "overlap_mask_area_threshold": 0.8, "stuff_classes": COCO_STUFF_CLASSES}),
    "mask2former": RegionSource("facebook/mask2former-swin-large-coco-panoptic", "mask2former", {}),
    "sam2": RegionSource("facebook/sam2-hiera-large", "sam2",
                         {"points_per_crop": 8, "pred_iou_thresh": 0.4, "stability_score_thresh": 0.4}),
}
DEFAULT_GENERATOR = "eomt"
FILES = ("config.json", "preprocessor_config.json", "model.safetensors")  # safetensors only: nothing unpickled


def _transformers():
    try:
        import transformers
    except ImportError:
        raise SegcliError("corrclip's region masks need transformers: pip install 'segcli[regions]'") from None
    return transformers


class RegionGenerator(nn.Module):
    """uint8 RGB [H,W,3] (a torch tensor on the model's device) -> region ids [H,W] int64."""

    def __init__(self, model: nn.Module, processor, settings: dict, kind: str):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.settings = dict(settings)
        self.kind = kind
        self._pipe = None  # sam2: transformers' mask-generation pipeline, made on first use

    @classmethod
    def from_folder(cls, folder: str | Path, kind: str | None = None) -> "RegionGenerator":
        """A transformers panoptic model saved in `folder` (config.json, preprocessor_config.json,
        model.safetensors). `kind` picks the post-processing settings; by default its model_type's."""
        folder = Path(folder)
        missing = [name for name in FILES if not (folder / name).is_file()]
        if missing:
            raise SegcliError(f"region-mask model folder {folder} lacks {', '.join(missing)}")
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
        kind = kind or next((k for k, s in GENERATORS.items() if s.model_type == model_type), None)
        if kind not in GENERATORS or GENERATORS[kind].model_type != model_type:
            raise SegcliError(f"{folder}: a {model_type!r} model is not a region-mask generator segcli knows "
                              f"({', '.join(s.model_type for s in GENERATORS.values())})")
        tf = _transformers()
        bars = tf.utils.logging.is_progress_bar_enabled()
        tf.utils.logging.disable_progress_bar()  # a local load needs no progress bar in segcli's output
        try:
            auto = tf.AutoModelForMaskGeneration if kind == "sam2" else tf.AutoModelForUniversalSegmentation
            model = auto.from_pretrained(folder, use_safetensors=True)
            processor = tf.AutoImageProcessor.from_pretrained(folder)
        except ImportError as exc:  # a library the model's transformers code needs (scipy, ...)
            missing = " ".join(str(exc).split())
            raise SegcliError(f"the {kind} region-mask model cannot load: {missing[:160]} "
                              "(pip install 'segcli[regions]')") from None
        finally:
            if bars:
                tf.utils.logging.enable_progress_bar()
        return cls(model, processor, GENERATORS[kind].settings, kind)

    @torch.inference_mode()
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != torch.uint8:
            raise ValueError(f"region masks take one uint8 [H,W,3] image, not {tuple(image.shape)} {image.dtype}")
        height, width = image.shape[:2]
        device = next(self.model.parameters()).device
        if self.kind == "sam2":
            return self._automatic_masks(image, device)
        inputs = self.processor(images=[image.permute(2, 0, 1).cpu()], return_tensors="pt")
        # fp32 whatever the run's autocast: segments are thresholds on the scores, kept as the authors'
        with torch.autocast(device.type, enabled=False):
            outputs = self.model(pixel_values=inputs["pixel_values"].to(device))
        result = self.processor.post_process_panoptic_segmentation(outputs, target_sizes=[(height, width)],
                                                                   **self.settings)[0]
        return result["segmentation"].to(device=image.device, dtype=torch.int64)

    def _automatic_masks(self, image: torch.Tensor, device: torch.device) -> torch.Tensor:
        """SAM 2's automatic masks -> ids: 0 where none lies, else 1.. by ascending area, a later
        (larger) mask laid over an earlier one (the authors' generate_mask)."""
        from PIL import Image

        tf = _transformers()
        if self._pipe is None:
            self._pipe = tf.pipeline("mask-generation", model=self.model, image_processor=self.processor,
                                     device=device)
        self._pipe.device = device  # the model may have moved since
        with torch.autocast(device.type, enabled=False):
            masks = self._pipe(Image.fromarray(image.cpu().numpy()), points_per_batch=64, **self.settings)["masks"]
        ids = torch.zeros(image.shape[:2], dtype=torch.int64)
        for index, mask in enumerate(sorted(masks, key=lambda m: int(m.sum())), start=1):
            ids[torch.as_tensor(mask, dtype=torch.bool)] = index
        return ids.to(image.device)
