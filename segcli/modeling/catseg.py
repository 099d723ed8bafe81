"""CAT-Seg (Cho et al., CVPR 2024): a trained open-vocabulary segmenter over fine-tuned CLIP.

As the authors' `cat_seg/cat_seg_model.py` computes it (CVPR version, inference):

1. CLIP's image tower at its resolution (384 for ViT-B/16, 336 for ViT-L/14@336; the stored position
   embedding resized bicubic where the grid differs), its last block read densely: the values of
   the last attention (`out_proj(v_proj(ln_1(x)))`) plus the input's class token, then the block's
   feed-forward, `ln_post` and the projection: dense features [B,C,24,24] in text space.
2. Two intermediate blocks' outputs (3 and 7 for B, 7 and 15 for L) upsampled x2 and x4 by
   transposed convolutions: the decoder's appearance guidance.
3. The fine-tuned text tower embeds each label through "A photo of a {} in the scene".
4. The cost volume and its aggregation (segcli.modeling.cost_aggregation) -> logits [B,K,96,96],
   resized (bilinear) to the input and passed through a sigmoid: scores in (0, 1), not softmaxed.

The sliding-window protocol (the photo resized to 640 x 640, 384-pixel windows every 256, plus the
whole photo at 384 as a global view, averaged half and half) is the family's `Protocol`, run by
segcli.inference.runner like every other model's, so --window/--stride/--short-side keep their meaning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU, VisionTransformer
from torch import nn

from segcli.modeling.backend import Capabilities
from segcli.modeling.clip_dense import clip_block
from segcli.modeling.configs import CATSEG_PROTOCOL, CATSegConfig
from segcli.modeling.cost_aggregation import Aggregator, SwinTransformerBlock
from segcli.modeling.pixel_text import PixelTextModel
from segcli.modeling.text_encoder import TextEncoder


class CATSeg(PixelTextModel):
    """Images [B,3,S,S] in [0,1] + label embeddings [K,C] -> per-pixel scores [B,K,S,S] in (0,1).

    State-dict names: `clip.visual.*` (open_clip's), `text_encoder.tower.*` (open_clip's text tower),
    `aggregator.*` and `upsample1/2.*` (the authors' names)."""

    default_prompt = "A photo of a {} in the scene"  # the authors' single template (PROMPT_ENSEMBLE_TYPE single)
    output_stride = 1

    def __init__(self, cfg: CATSegConfig):
        super().__init__(cfg)
        self.visual = VisionTransformer(
            image_size=cfg.pos_embed_grid * cfg.patch_size, patch_size=cfg.patch_size, width=cfg.width, layers=cfg.layers,
            heads=cfg.heads, mlp_ratio=4.0, output_dim=cfg.text.embed_dim, act_layer=QuickGELU)
        self.text_encoder = TextEncoder(cfg.text)
        grid = cfg.clip_resolution // cfg.patch_size
        self.upsample1 = nn.ConvTranspose2d(cfg.width, cfg.decoder_guidance_dims[0], kernel_size=2, stride=2)
        self.upsample2 = nn.ConvTranspose2d(cfg.width, cfg.decoder_guidance_dims[1], kernel_size=4, stride=4)
        self.aggregator = Aggregator(
            text_guidance_dim=cfg.text.embed_dim, text_guidance_proj_dim=cfg.guidance_proj_dim,
            appearance_guidance_dim=cfg.text.embed_dim, appearance_guidance_proj_dim=cfg.guidance_proj_dim,
            decoder_dims=cfg.decoder_dims, decoder_guidance_dims=cfg.decoder_guidance_dims,
            decoder_guidance_proj_dims=cfg.decoder_guidance_proj_dims, num_layers=cfg.num_layers, nheads=cfg.num_heads,
            hidden_dim=cfg.hidden_dim, pooling_size=(1, 1), feature_resolution=(grid, grid), window_size=cfg.window_size,
            prompt_channel=1, pad_len=cfg.pad_len)
        self.class_chunk = 64  # classes through the per-class stages at a time: memory, never the numbers

    def family_capabilities(self) -> Capabilities:
        """A cost-volume model: its scores come out of aggregating image-text similarities, so
        there are no pixel embeddings to store or relabel, and its sigmoid scores are no softmax."""
        return Capabilities(family=self.cfg.family, provides_embeddings=False, exportable=False, int8=False,
                            limits="catseg is a cost-volume model: its scores need the labels inside the network",
                            probability_scale=1.0, default_synonyms="mean", default_protocol=CATSEG_PROTOCOL,
                            scores="sigmoid")

    @property
    def input_multiple(self) -> int:
        return self.cfg.input_multiple

    def pixel_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("catseg gives no pixel embeddings: its scores need the labels")

    def rebuild_buffers(self, device: str | torch.device) -> None:
        super().rebuild_buffers(device)
        for module in self.aggregator.modules():
            if isinstance(module, SwinTransformerBlock) and module.shift:
                module.attn_mask = module._shift_mask().to(device)

    def clip_features(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """[B,3,R,R] normalised at CLIP's resolution R -> (dense features [B,C,g,g] in text space,
        the guidance blocks' outputs [B,width,g,g])."""
        v = self.visual
        x = v.conv1(images)
        b, _, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([v.class_embedding.to(x.dtype).expand(b, 1, -1), x], dim=1)
        x = v.ln_pre(x + self._position_embedding(h * w).to(x.dtype))
        guidance = []
        for i, block in enumerate(v.transformer.resblocks[:-1]):
            x = clip_block(block, x)
            if i in self.cfg.guidance_layers:
                guidance.append(x[:, 1:].transpose(1, 2).reshape(b, -1, h, w))
        x = self._dense_block(v.transformer.resblocks[-1], x)
        x = v.ln_post(x) @ v.proj.to(x.dtype)
        return x[:, 1:].transpose(1, 2).reshape(b, -1, h, w), guidance

    def _position_embedding(self, patches: int) -> torch.Tensor:
        """The stored embedding, its patch part resized bicubic to the grid of `patches` tokens when it differs."""
        stored = self.visual.positional_embedding
        if stored.shape[0] == patches + 1:
            return stored
        grid, side = round((stored.shape[0] - 1) ** 0.5), int(patches ** 0.5)
        grid_embed = stored[1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        resized = F.interpolate(grid_embed, size=(side, side), mode="bicubic", align_corners=False)
        return torch.cat([stored[:1], resized.squeeze(0).flatten(1).T])

    @staticmethod
    def _dense_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The last block as CAT-Seg reads it densely: every token's attention value (through the
        output projection) plus the input's class token, then the block's feed-forward."""
        attn = block.attn
        v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)[2]
        v = attn.out_proj(v) + x[:, :1]
        return v + block.mlp(block.ln_2(v))

    def dense_logits(self, images: torch.Tensor, label_embeddings: torch.Tensor, autocast_dtype: torch.dtype | None = None,
                     return_embeddings: bool = False) -> tuple[torch.Tensor, None]:
        """[B,3,S,S] in [0,1] + [K,C] -> (scores [B,K,S,S] fp32 in (0,1), None). The network runs
        under autocast; the sigmoid and the resize to the input in fp32."""
        if return_embeddings:
            raise ValueError("catseg gives no pixel embeddings")
        size = images.shape[-2:]
        r = self.cfg.clip_resolution
        with torch.autocast(images.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            x = (images - self.pixel_mean) / self.pixel_std
            if tuple(size) != (r, r):
                x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False)
            features, (mid, late) = self.clip_features(x)
            guidance = [features, self.upsample1(mid), self.upsample2(late)]
            text = label_embeddings.to(features.dtype)[None, :, None].expand(images.shape[0], -1, -1, -1)
            logits = self.aggregator(features, text, guidance, self.class_chunk)
        logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
        return logits.sigmoid(), None

    def score(self, pixel_embeddings, label_embeddings, return_embeddings=False):
        raise NotImplementedError("catseg gives no pixel embeddings to score")
