"""CorrCLIP (Zhang et al., ICCV 2025): CLIP's patch correlations rebuilt from DINO and region masks.

CorrCLIP replaces what CLIP's last block attends to. With f the L2-normalised DINO ViT-B/8 "q+k"
features of the window (its last block's query plus key, all heads, at 1/8) and S = f f^T:

- **Scope.** A class-agnostic generator's region masks (EoMT, segcli.modeling.regions), at DINO's
  grid, are merged when their mean DINO features are close (DBSCAN, eps 0.2, min_samples 1, distance
  max(sim) - sim). A patch attends only inside its merged region; patches outside every region
  (the smallest id: "unsegmented") attend to and are attended by any patch whose S passes its mean.
- **Value.** The weights are softmax(4 S) over that scope, shared by every head, applied to CLIP's
  last-block values (bilinear to DINO's grid) of the main branch (the tokens) and of the spatial
  branch (the mean of blocks 5-9's outputs for ViT-B); each through out_proj, no residual, no MLP.
- **Semantic branch.** One extra class token per region (regions at CLIP's grid) attends, in every
  block, to the class token and the patches of its region; each patch takes its region's token.

The three go through ln_post and are summed (1, 1, 0.5), then projected. The per-region majority
vote on the final label map ("map correction") is segcli.inference.regions. The authors run one
window at a time (their semantic branch takes batch size 1); here windows are batched, each with its
own regions, and nothing mixes between them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MERGE_EPS = 0.2  # DBSCAN's eps over max(sim) - sim of the regions' mean DINO features
TAU = 4.0  # the correlations' temperature
SPATIAL_WEIGHT, SEMANTIC_WEIGHT = 1.0, 0.5  # ALPHA and BETA in the authors' code
MERGED_BASE = 10000  # merged regions take ids 10000 + cluster, as in the authors' code
PAD_REGION = 10000  # window pixels off the image: one region of their own (the authors pad masks with 10000)


def spatial_blocks(layers: int) -> range:
    """The blocks whose outputs the spatial branch averages (5-9 of 12, 11-22 of 24, 3-30 of 32)."""
    count = {12: 5, 24: 12, 32: 28}.get(layers, layers - 4)
    return range(layers - 2 - count, layers - 2)


def dbscan_min1(distance: np.ndarray, eps: float) -> np.ndarray:
    """scikit-learn's DBSCAN(eps, min_samples=1, metric="precomputed").fit_predict(distance): with
    one sample enough, every point whose row has a distance <= eps is a core point and clusters are
    the points reachable through such rows, numbered by their first point; others are -1."""
    n = len(distance)
    neighbours = [np.flatnonzero(distance[i] <= eps) for i in range(n)]
    labels = np.full(n, -1, dtype=np.int64)
    label = 0
    for start in range(n):
        if labels[start] != -1 or len(neighbours[start]) == 0:
            continue
        stack = [start]
        while stack:
            i = stack.pop()
            if labels[i] != -1:
                continue
            labels[i] = label
            if len(neighbours[i]):
                stack.extend(int(j) for j in neighbours[i] if labels[j] == -1)
        label += 1
    return labels


def merge_regions(ids: torch.Tensor, features: torch.Tensor, eps: float = MERGE_EPS) -> torch.Tensor:
    """Region ids [h,w] at DINO's grid, normalised features [h*w,c] -> ids with similar regions
    merged (MERGED_BASE + cluster). The smallest id is the unsegmented part and never merged; with
    two ids or fewer nothing is."""
    values = torch.unique(ids)
    if len(values) <= 2:
        return ids
    masks = values[:, None, None] == ids  # [R,h,w]
    flat = masks.flatten(1).to(features.dtype)
    means = F.normalize((flat @ features) / flat.sum(1, keepdim=True), dim=1)[1:]
    similarity = means @ means.T
    clusters = dbscan_min1((similarity.max() - similarity).float().cpu().numpy(), eps)
    merged = ids.clone()
    for mask, cluster in zip(masks[1:], clusters):
        if cluster != -1:
            merged[mask] = MERGED_BASE + int(cluster)
    return merged


def correlation_weights(features: torch.Tensor, merged: torch.Tensor) -> torch.Tensor:
    """Normalised DINO features [L,c] and merged ids [L] -> attention weights [L,L]: softmax(TAU S)
    inside each region; the unsegmented patches (the smallest id) with any patch whose S exceeds
    S's mean. A row nothing passes (a flat image) keeps its own patch."""
    similarity = features @ features.T
    outside = merged == merged.min()
    allowed = (merged[:, None] == merged[None, :]) & ~outside[:, None]
    allowed |= (outside[:, None] | outside[None, :]) & (similarity > similarity.mean())
    dead = ~allowed.any(1)
    if dead.any():
        allowed[dead, dead.nonzero()[:, 0]] = True
    return (similarity * TAU).masked_fill(~allowed, float("-inf")).softmax(-1)


def region_token_masks(merged: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Merged ids [H',W'] at DINO's grid -> one mask per region [R,h*w] at CLIP's grid (nearest),
    the regions in id order (the unsegmented one first)."""
    ids = F.interpolate(merged[None, None].float(), size=grid_hw, mode="nearest")[0, 0].long()
    values = torch.unique(ids)
    return (values[:, None] == ids.flatten()[None, :])


def _cross_attention(block: nn.Module, queries: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One residual block for extra tokens [B,R,w] that read `tokens` [B,N,w] where `mask` [B,R,N]
    allows, as open_clip's block would run them appended to the sequence with that attention mask."""
    attn = block.attn
    width = tokens.shape[-1]
    w_q, w_kv = attn.in_proj_weight.split([width, 2 * width])
    b_q, b_kv = attn.in_proj_bias.split([width, 2 * width])
    q = F.linear(block.ln_1(queries), w_q, b_q)
    k, v = F.linear(block.ln_1(tokens), w_kv, b_kv).chunk(2, dim=-1)
    q, k, v = (t.unflatten(-1, (attn.num_heads, -1)).transpose(1, 2) for t in (q, k, v))  # [B,heads,*,d]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
    x = queries + block.ls_1(attn.out_proj(out.transpose(1, 2).flatten(2)))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def corrclip_tokens(visual: nn.Module, run_block, x: torch.Tensor, grid_hw: tuple[int, int],
                    dino: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """CLIP tokens after ln_pre [B,1+h*w,w], DINO q+k features [B,c,H',W'], region ids at the
    window's pixels [B,H,W] -> the three branches summed after ln_post [B,H'*W',w] (before `proj`).
    `run_block(block, x)` is the model's ordinary residual block."""
    b, layers = x.shape[0], len(visual.transformer.resblocks)
    big = dino.shape[-2:]
    features = F.normalize(dino.flatten(2).transpose(1, 2).float(), dim=-1)  # [B,L,c]
    ids = F.interpolate(regions[:, None].float(), size=big, mode="nearest")[:, 0].long()  # [B,H',W']
    weights, token_masks = [], []
    for i in range(b):
        merged = merge_regions(ids[i], features[i])
        weights.append(correlation_weights(features[i], merged.flatten()))
        token_masks.append(region_token_masks(merged, grid_hw))
    weights = torch.stack(weights)  # [B,L,L]
    count = max(len(m) for m in token_masks)
    # each region token reads the class token and its region's patches; padding rows read the class token
    read = torch.zeros(b, count, x.shape[1], dtype=torch.bool, device=x.device)
    read[:, :, 0] = True
    for i, masks in enumerate(token_masks):
        read[i, :len(masks), 1:] = masks
    region_tokens = x[:, :1].expand(b, count, -1)
    spatial = []
    for index, block in enumerate(visual.transformer.resblocks[:-1]):
        region_tokens = _cross_attention(block, region_tokens, x, read)
        x = run_block(block, x)
        if index in spatial_blocks(layers):
            spatial.append(x)
    last = visual.transformer.resblocks[-1]
    region_tokens = _cross_attention(last, region_tokens, x, read)
    attn, width = last.attn, x.shape[-1]
    w_v, b_v = attn.in_proj_weight[2 * width:], attn.in_proj_bias[2 * width:]
    branches = []
    for tokens in (x, torch.stack(spatial).mean(0)):
        v = F.linear(last.ln_1(tokens), w_v, b_v)[:, 1:].transpose(1, 2).unflatten(-1, grid_hw)  # [B,w,h,w]
        v = F.interpolate(v, size=big, mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
        branches.append(attn.out_proj(weights.to(v.dtype) @ v))  # [B,L,w]
    semantic = []
    for i, masks in enumerate(token_masks):
        # each DINO-grid patch takes the token of the region it lies in at CLIP's grid (nearest)
        grid = masks.float().unflatten(1, grid_hw)[None]
        up = F.interpolate(grid, size=big, mode="nearest")[0].flatten(1)  # [R,L]
        semantic.append(up.T.to(region_tokens.dtype) @ region_tokens[i, :len(masks)])
    semantic = torch.stack(semantic)
    main, spatial_branch = branches
    return (visual.ln_post(main) + SPATIAL_WEIGHT * visual.ln_post(spatial_branch)
            + SEMANTIC_WEIGHT * visual.ln_post(semantic))
