"""Training-free dense CLIP: a pretrained CLIP ViT whose patch tokens are projected into text space.

A CLIP image tower is trained to pool one vector per image; its patch tokens, read as they are,
match text poorly. The training-free methods run the last transformer block differently, with no
residual path and no feed-forward (`cfg.method`):

- clearclip (Lan et al., ECCV 2024): query-query attention. Published ADE-150 mIoU (ViT-B/16): 16.7.
- naclip (Hajimiri et al., WACV 2025): key-key attention plus a Gaussian over the patch grid, so
  each patch attends to its neighbourhood: softmax(k k^T / sqrt(d) + G) v with
  G[(i,j),(k,l)] = exp(-((i-k)^2 + (j-l)^2) / (2 std^2)) and 0 for the class token. Published
  ADE-150 mIoU (ViT-B/16, with PAMR and its sliding-window protocol): 19.1.
- proxyclip (Lan et al., ECCV 2024): the attention comes from a second model, DINO ViT-B/8
  (segcli.modeling.dino): with f the L2-normalised DINO patch features of the image (at 1/8),
  S = f^T f, A = softmax((S - beta mean(S)) gamma, entries below 0 at -inf), and the output is A V,
  CLIP's patch values upsampled (bilinear) to DINO's grid: pixel embeddings at stride 8.
  Published ADE-150 mIoU (ViT-B/16 + DINO ViT-B/8): 20.2 (third-party tables; the paper's own
  table lists it with ViT-H/14 CLIP).
- corrclip (Zhang et al., ICCV 2025): DINO ViT-B/8's q+k correlations restricted to merged region
  masks, plus a spatial and a semantic branch (segcli.modeling.corrclip), at DINO's stride 8; the
  region masks come from a class-agnostic generator (segcli.modeling.regions) run on each photo.
  Published ADE-150 mIoU (MetaCLIP ViT-B/16 + DINO ViT-B/8 + EoMT-L masks): 26.7.

The resulting tokens go through the final LayerNorm and the visual projection, like the class token
normally does, and land in the text embedding space.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU, VisionTransformer
from torch import nn

from segcli.modeling.backend import Capabilities
from segcli.modeling.configs import CLIP_DENSE_METHODS, CLIPDenseConfig
from segcli.modeling.corrclip import corrclip_tokens
from segcli.modeling.dino import DinoViT
from segcli.modeling.pixel_text import PixelTextModel, build_from_state_dict
from segcli.modeling.text_encoder import TextEncoder


class CLIPDense(PixelTextModel):
    """Images in [0,1] -> pixel embeddings at 1/patch resolution; + labels -> logits.

    Shapes: images [B,3,H,W] with H, W multiples of the patch size p; pixel embeddings [B,C,H/p,W/p];
    label embeddings [K,C]; logits [B,K,H/p,W/p] (`forward` resizes them to [B,K,H,W]).
    State-dict names are open_clip's CLIP names, with the text tower under `text_encoder.tower.`.
    """

    default_prompt = "imagenet80"  # CLIP's 80 ImageNet templates averaged, as ClearCLIP, SCLIP and NACLIP

    def __init__(self, cfg: CLIPDenseConfig):
        super().__init__(cfg)
        self.visual = VisionTransformer(
            image_size=cfg.pos_embed_grid * cfg.patch_size, patch_size=cfg.patch_size, width=cfg.width,
            layers=cfg.layers, heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, output_dim=cfg.embed_dim,
            act_layer=QuickGELU if cfg.quick_gelu else nn.GELU,
        )
        self.visual.requires_grad_(False)  # training-free: nothing here is ever trained
        self.text_encoder = TextEncoder(cfg.text)
        if cfg.method not in CLIP_DENSE_METHODS:
            raise ValueError(f"unknown clip-dense method {cfg.method!r}")
        if (CLIP_DENSE_METHODS[cfg.method].proxy is not None) != (cfg.proxy is not None):
            raise ValueError(f"clip-dense method {cfg.method!r} {'needs' if cfg.proxy is None else 'takes no'} a proxy model")
        self.proxy = DinoViT(cfg.proxy) if cfg.proxy is not None else None
        self._generator: list[nn.Module] = []  # corrclip's region masks (segcli.modeling.regions), set by the loader
        self._reads_regions = CLIP_DENSE_METHODS[cfg.method].regions is not None
        if self._reads_regions and cfg.layers < 5:
            raise ValueError(f"corrclip's spatial branch needs a CLIP of 5 blocks or more, not {cfg.layers}")
        self.output_stride = cfg.output_stride
        self._bias_cache: dict = {}

    @property
    def region_generator(self) -> nn.Module | None:
        """The model that makes corrclip's region masks. Held outside the state dict (a checkpoint
        stores CLIP and DINO only), yet moved and cast with the model."""
        return self._generator[0] if self._generator else None

    def set_region_generator(self, generator: nn.Module | None) -> None:
        self._generator = [generator] if generator is not None else []  # a list: nn.Module would register it

    def _apply(self, fn, recurse: bool = True):
        for generator in self._generator:
            generator._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def family_capabilities(self) -> Capabilities:
        """The method's row (CLIP_DENSE_METHODS) as the backend contract says it: its authors'
        protocol (short-side resize, sliding windows), synonyms scored each on its own (the label
        keeps its best: ClearCLIP, SCLIP, NACLIP), its softmax temperature over this model's logit
        scale (--bg-threshold), its refinement; a method that reads each photo's region masks
        (corrclip: `pixel_embeddings` takes their ids) stores no cells and does not export."""
        row = CLIP_DENSE_METHODS[self.cfg.method]
        regions = self._reads_regions
        return Capabilities(family=self.cfg.family, method=row.name, int8=True, needs_regions=regions,
                            provides_embeddings=not regions, exportable=not regions,
                            limits="corrclip reads each photo's region masks (and votes in them)" if regions else None,
                            probability_scale=row.probability_scale / self.logit_scale, default_synonyms="max",
                            default_protocol=row.protocol, default_refine=row.refine)

    def position_embedding(self, grid_hw: tuple[int, int]) -> torch.Tensor:
        """[1 + h*w, width]: the stored embedding with its patch part resized (bicubic) to `grid_hw`;
        proxyclip as its authors' code does it (DINO's way: a scale factor of (n + 0.1) / g)."""
        stored = self.visual.positional_embedding
        g = self.cfg.pos_embed_grid
        if grid_hw == (g, g):
            return stored
        patches = stored[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
        if self.proxy is not None:
            factor = ((grid_hw[0] + 0.1) / g, (grid_hw[1] + 0.1) / g)
            patches = F.interpolate(patches, scale_factor=factor, mode="bicubic")
        else:
            patches = F.interpolate(patches, size=grid_hw, mode="bicubic", align_corners=False)
        return torch.cat([stored[:1], patches.flatten(2).squeeze(0).T])

    def pixel_embeddings(self, images: torch.Tensor, regions: torch.Tensor | None = None) -> torch.Tensor:
        """[B,3,H,W] in [0,1] -> [B,C,H/s,W/s] (not normalised); s the patch size, DINO's for proxyclip
        and corrclip. corrclip also takes the region ids of the inputs' pixels [B,H,W]."""
        p = self.cfg.input_multiple
        if images.shape[-2] % p or images.shape[-1] % p:
            raise ValueError(f"input size {tuple(images.shape[-2:])} must be a multiple of {p}")
        v = self.visual
        x = v.conv1((images - self.pixel_mean) / self.pixel_std)  # [B,width,h,w]
        b, _, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([v.class_embedding.to(x.dtype).expand(b, 1, -1), x], dim=1)
        x = v.ln_pre(x + self.position_embedding((h, w)).to(x.dtype))
        if self._reads_regions:
            if regions is None or regions.shape != (b, *images.shape[-2:]):
                raise ValueError(f"corrclip needs region ids [B,H,W] for its {tuple(images.shape)} inputs")
            features = self.proxy(images, query_key=True)  # [B,width',H/8,W/8]
            x = corrclip_tokens(v, self._block, x, (h, w), features, regions) @ v.proj.to(x.dtype)
            return x.transpose(1, 2).reshape(b, -1, *features.shape[-2:])
        for block in v.transformer.resblocks[:-1]:
            x = self._block(block, x)
        if self.proxy is not None:
            features = self.proxy(images)  # [B,width',H/8,W/8]
            x = self._proxy_block(v.transformer.resblocks[-1], x, (h, w), features)
            h, w = features.shape[-2:]
        else:
            x = self._last_block(v.transformer.resblocks[-1], x, (h, w))[:, 1:]
        x = v.ln_post(x) @ v.proj.to(x.dtype)  # [B,h*w,C]
        return x.transpose(1, 2).reshape(b, -1, h, w)

    _block = staticmethod(lambda block, x: clip_block(block, x))

    def _last_block(self, block: nn.Module, x: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """The method's last block on tokens [B,1+h*w,width]: attention only (no residual, no
        feed-forward). clearclip: query-query; naclip: key-key plus the neighbourhood Gaussian."""
        attn = block.attn
        q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (attn.num_heads, -1)).transpose(1, 2) for t in (q, k, v))  # [B,heads,N,d]
        if self.cfg.method == "naclip":
            out = F.scaled_dot_product_attention(k, k, v, attn_mask=self._neighbourhood(grid_hw, x.dtype, x.device))
        else:
            out = F.scaled_dot_product_attention(q, q, v)
        return attn.out_proj(out.transpose(1, 2).flatten(2))

    def _proxy_block(self, block: nn.Module, x: torch.Tensor, grid_hw: tuple[int, int],
                     features: torch.Tensor) -> torch.Tensor:
        """ProxyCLIP's last block: tokens [B,1+h*w,width] and proxy features [B,c,H',W'] -> the
        patches' outputs [B,H'*W',width]. The attention is the proxy's patch similarity, thresholded
        at beta x its mean and sharpened by gamma (per image: the authors run one image at a time),
        over CLIP's patch values brought to the proxy's grid (bilinear)."""
        attn = block.attn
        _, _, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        b, heads = x.shape[0], attn.num_heads
        h, w = grid_hw
        big_h, big_w = features.shape[-2:]
        f = F.normalize(features.flatten(2).float(), dim=1)  # [B,c,H'W']
        similarity = f.transpose(1, 2) @ f  # [B,H'W',H'W']
        mean = similarity.mean(dim=(1, 2), keepdim=True)
        similarity = (similarity - mean * self.cfg.proxy_beta) * self.cfg.proxy_gamma
        scores = similarity.masked_fill(similarity < 0, float("-inf"))
        dead = torch.isinf(scores).all(-1)  # [B,H'W']: no patch passes (a near-uniform photo): the authors'
        if dead.any():  # softmax gives NaN there; here such a patch keeps its own value
            image, patch = dead.nonzero(as_tuple=True)
            scores[image, patch, patch] = 0.0
        weights = scores.softmax(-1).to(v.dtype)
        values = v[:, 1:].unflatten(-1, (heads, -1)).permute(0, 2, 3, 1).reshape(b * heads, -1, h, w)  # [B*heads,d,h,w]
        values = F.interpolate(values, size=(big_h, big_w), mode="bilinear", align_corners=False)
        values = values.reshape(b, heads, -1, big_h * big_w).transpose(2, 3)  # [B,heads,H'W',d]
        out = weights[:, None] @ values  # [B,heads,H'W',d]: the same weights for every head
        return attn.out_proj(out.transpose(1, 2).flatten(2))

    def _neighbourhood(self, grid_hw: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """[1+h*w, 1+h*w] additive attention bias: the Gaussian of the grid distance between patches
        (std `cfg.gaussian_std` patches), 0 in the class token's row and column. Cached per grid."""
        key = (grid_hw, dtype, device)
        cached = self._bias_cache.get(key)
        if cached is None:
            h, w = grid_hw
            rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
            yx = torch.stack([rows.flatten(), cols.flatten()], 1).float()  # [h*w, 2]
            squared = (yx[:, None] - yx[None]).square().sum(-1)  # exact: whole numbers
            gauss = torch.exp(-squared / (2 * self.cfg.gaussian_std ** 2))
            cached = F.pad(gauss, (1, 0, 1, 0)).to(dtype)  # the class token: no neighbourhood
            self._bias_cache = {key: cached}  # one grid at a time: inputs of one run share it
        return cached

    def forward(self, images: torch.Tensor, label_embeddings: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [0,1], [K,C] -> logits [B,K,H,W] (bilinear from 1/p resolution)."""
        logits = self.logits(self.pixel_embeddings(images), label_embeddings)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def clip_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip's residual block [B,N,width] -> [B,N,width], its attention through SDPA: the same
    sums as nn.MultiheadAttention, whose CPU fast path is 10x slower on bf16 batches."""
    attn = block.attn
    q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.unflatten(-1, (attn.num_heads, -1)).transpose(1, 2) for t in (q, k, v))  # [B,heads,N,d]
    x = x + block.ls_1(attn.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def clip_dense_from_state_dict(cfg: CLIPDenseConfig, state: dict[str, torch.Tensor],
                               device: str | torch.device = "cpu") -> CLIPDense:
    """A CLIPDense holding exactly `state` (segcli names; strict). RuntimeError on mismatch."""
    return build_from_state_dict(CLIPDense, cfg, state, device)
