"""CAT-Seg's cost aggregation (Cho et al., CVPR 2024): a cost volume of image-text cosine
similarities refined by spatial and class aggregation, then upsampled with CLIP's own features.

Module and parameter names follow the authors' `cat_seg/modeling/transformer/model.py`, so their
checkpoint's `sem_seg_head.predictor.transformer.*` tensors load under `aggregator.*` unchanged.

Shapes (B images, T classes, P prompt templates, C text width, H x W the CLIP patch grid):
    image features [B,C,H,W], text features [B,T,P,C]  ->  logits [B,T,4H,4W]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """[B,H,W,C] -> [B*nW, window, window, C] (Swin's non-overlapping windows)."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c)


def window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """[B*nW, window, window, C] -> [B,H,W,C]."""
    b = windows.shape[0] // ((h // window) * (w // window))
    x = windows.view(b, h // window, w // window, window, window, -1)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, -1)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside a window; queries and keys also read the appearance
    guidance (CLIP's features) concatenated to the tokens, values only the tokens."""

    def __init__(self, dim: int, guidance_dim: int, num_heads: int):
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim + guidance_dim, dim)
        self.k = nn.Linear(dim + guidance_dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B*nW, N, dim + guidance] -> [B*nW, N, dim]; mask [nW, N, N] (0 / -100) or None."""
        b, n, _ = x.shape
        q = self.q(x).reshape(b, n, self.num_heads, -1).transpose(1, 2) * self.scale
        k = self.k(x).reshape(b, n, self.num_heads, -1).transpose(1, 2)
        v = self.v(x[:, :, :self.dim]).reshape(b, n, self.num_heads, -1).transpose(1, 2)
        attn = q @ k.transpose(-2, -1)
        if mask is not None:
            windows = mask.shape[0]
            attn = (attn.view(b // windows, windows, self.num_heads, n, n) + mask[None, :, None]).view(-1, self.num_heads, n, n)
        out = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, -1)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinTransformerBlock(nn.Module):
    """One (shifted) window attention block over a fixed `resolution` grid, with guidance."""

    def __init__(self, dim: int, guidance_dim: int, resolution: tuple[int, int], num_heads: int, window: int,
                 shift: int):
        super().__init__()
        self.resolution = resolution
        if min(resolution) <= window:  # a window as large as the grid: no partition, no shift
            window, shift = min(resolution), 0
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, guidance_dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * 4)
        # not in the state dict: rebuilt from the grid (the authors' checkpoints store it; it is checked, not read)
        self.register_buffer("attn_mask", self._shift_mask() if shift else None, persistent=False)

    def _shift_mask(self) -> torch.Tensor:
        """[nW, window^2, window^2]: -100 between tokens that the cyclic shift made neighbours."""
        h, w = self.resolution
        regions = torch.zeros(1, h, w, 1)
        cuts = (slice(0, -self.window), slice(-self.window, -self.shift), slice(-self.shift, None))
        count = 0
        for hs in cuts:
            for ws in cuts:
                regions[:, hs, ws, :] = count
                count += 1
        ids = window_partition(regions, self.window).view(-1, self.window * self.window)
        mask = ids[:, None, :] - ids[:, :, None]
        return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)

    def forward(self, x: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
        """x [B,H*W,dim], guidance [B,H*W,G] or None -> [B,H*W,dim]."""
        h, w = self.resolution
        b, length, c = x.shape
        shortcut = x
        x = self.norm1(x).view(b, h, w, c)
        if guidance is not None:
            x = torch.cat([x, guidance.view(b, h, w, -1)], dim=-1)
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        windows = window_partition(x, self.window).view(-1, self.window * self.window, x.shape[-1])
        windows = self.attn(windows, mask=self.attn_mask).view(-1, self.window, self.window, c)
        x = window_reverse(windows, self.window, h, w)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        x = shortcut + x.reshape(b, h * w, c)
        return x + self.mlp(self.norm2(x))


class SwinTransformerBlockWrapper(nn.Module):
    """Spatial aggregation: a window block and a shifted one, each class's cost map on its own."""

    def __init__(self, dim: int, guidance_dim: int, resolution: tuple[int, int], num_heads: int, window: int):
        super().__init__()
        self.block_1 = SwinTransformerBlock(dim, guidance_dim, resolution, num_heads, window, 0)
        self.block_2 = SwinTransformerBlock(dim, guidance_dim, resolution, num_heads, window, window // 2)
        self.guidance_norm = nn.LayerNorm(guidance_dim) if guidance_dim > 0 else None

    def forward(self, x: torch.Tensor, guidance: torch.Tensor | None, class_chunk: int) -> torch.Tensor:
        """x [B,C,T,H,W], guidance [B,G,H,W] -> [B,C,T,H,W]; the classes go `class_chunk` at a time
        (each class's map is independent here, so chunking changes no number)."""
        b, c, t, h, w = x.shape
        if guidance is not None:
            guidance = self.guidance_norm(guidance.flatten(2).transpose(1, 2))  # [B,H*W,G]
        out = torch.empty_like(x)
        for start in range(0, t, class_chunk):
            part = x[:, :, start:start + class_chunk]
            n = part.shape[2]
            tokens = part.permute(0, 2, 3, 4, 1).reshape(b * n, h * w, c)
            g = guidance.repeat_interleave(n, dim=0) if guidance is not None else None
            tokens = self.block_2(self.block_1(tokens, g), g)
            out[:, :, start:start + n] = tokens.view(b, n, h, w, c).permute(0, 4, 1, 2, 3)
        return out


class LinearAttention(nn.Module):
    """Katharopoulos et al.'s linear attention with the elu+1 feature map: for queries Q, keys K
    [N,L,H,D], values V [N,S,H,D]: out_l = phi(Q_l) (sum_s phi(K_s) V_s^T) / (phi(Q_l) . sum_s phi(K_s))."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        q, k = F.elu(queries) + 1, F.elu(keys) + 1
        length = values.size(1)
        values = values / length  # as the authors: keeps fp16 sums in range
        kv = torch.einsum("nshd,nshv->nhdv", k, values)
        z = 1 / (torch.einsum("nlhd,nhd->nlh", q, k.sum(dim=1)) + self.eps)
        return torch.einsum("nlhd,nhdv,nlh->nlhv", q, kv, z) * length


class AttentionLayer(nn.Module):
    def __init__(self, hidden_dim: int, guidance_dim: int, nheads: int):
        super().__init__()
        self.nheads = nheads
        self.q = nn.Linear(hidden_dim + guidance_dim, hidden_dim)
        self.k = nn.Linear(hidden_dim + guidance_dim, hidden_dim)
        self.v = nn.Linear(hidden_dim, hidden_dim)
        self.attention = LinearAttention()

    def forward(self, x: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
        """x [N,T,C], guidance [N,T,G] -> [N,T,C]: attention across the classes."""
        xg = torch.cat([x, guidance], dim=-1) if guidance is not None else x
        n, t, _ = x.shape
        q, k, v = (p.view(n, t, self.nheads, -1) for p in (self.q(xg), self.k(xg), self.v(x)))
        return self.attention(q, k, v).reshape(n, t, -1)


class ClassTransformerLayer(nn.Module):
    """Class aggregation: at every position, the classes attend to each other (linear attention),
    guided by their text embeddings; padded with learned tokens to `pad_len` classes."""

    def __init__(self, hidden_dim: int, guidance_dim: int, nheads: int, pooling_size: tuple[int, int], pad_len: int):
        super().__init__()
        self.pool = nn.AvgPool2d(pooling_size)
        self.attention = AttentionLayer(hidden_dim, guidance_dim, nheads)
        self.MLP = nn.Sequential(nn.Linear(hidden_dim, hidden_dim * 4), nn.ReLU(), nn.Linear(hidden_dim * 4, hidden_dim))
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.pad_len = pad_len
        self.row_chunk = 1024  # positions through the attention at a time (each sees its pad_len classes)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, hidden_dim)) if pad_len > 0 else None
        self.padding_guidance = nn.Parameter(torch.zeros(1, 1, guidance_dim)) if pad_len > 0 and guidance_dim > 0 else None

    def forward(self, x: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
        """x [B,C,T,H,W], guidance [B,T,G] -> [B,C,T,H,W]."""
        b, c, t, h, w = x.shape
        pooled = self.pool(x.transpose(1, 2).reshape(b * t, c, h, w))
        hp, wp = pooled.shape[-2:]
        pooled = pooled.view(b, t, c, hp, wp).permute(0, 3, 4, 1, 2).reshape(b * hp * wp, t, c)  # [(B h w),T,C]
        pad = self.pad_len - t if self.padding_tokens is not None and t < self.pad_len else 0
        if guidance is not None and pad and self.padding_guidance is not None:
            guidance = torch.cat([guidance, self.padding_guidance.expand(b, pad, -1)], dim=1)
        rows = []
        for start in range(0, pooled.shape[0], self.row_chunk):  # positions are independent: bounded memory
            part = pooled[start:start + self.row_chunk]
            if pad:
                part = torch.cat([part, self.padding_tokens.expand(part.shape[0], pad, c)], dim=1)
            owner = torch.arange(start, start + part.shape[0], device=part.device) // (hp * wp)
            part = part + self.attention(self.norm1(part), guidance[owner] if guidance is not None else None)
            rows.append((part + self.MLP(self.norm2(part)))[:, :t])
        pooled = torch.cat(rows).reshape(b, hp, wp, t, c).permute(0, 3, 4, 1, 2).reshape(b * t, c, hp, wp)
        up = F.interpolate(pooled, size=(h, w), mode="bilinear", align_corners=True)
        return x + up.view(b, t, c, h, w).transpose(1, 2)


class AggregatorLayer(nn.Module):
    def __init__(self, hidden_dim: int, text_guidance_dim: int, appearance_guidance: int, nheads: int,
                 resolution: tuple[int, int], pooling_size: tuple[int, int], window: int, pad_len: int):
        super().__init__()
        self.swin_block = SwinTransformerBlockWrapper(hidden_dim, appearance_guidance, resolution, nheads, window)
        self.attention = ClassTransformerLayer(hidden_dim, text_guidance_dim, nheads, pooling_size, pad_len)

    def forward(self, x, appearance_guidance, text_guidance, class_chunk: int):
        return self.attention(self.swin_block(x, appearance_guidance, class_chunk), text_guidance)


class DoubleConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.GroupNorm(out_channels // 16, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.GroupNorm(out_channels // 16, out_channels),
            nn.ReLU(inplace=True))

    def forward(self, x):
        return self.double_conv(x)


class Up(nn.Module):
    """x2 upsampling (transposed conv), CLIP's guidance concatenated, then two 3x3 convs."""

    def __init__(self, in_channels: int, out_channels: int, guidance_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels - guidance_channels, kernel_size=2, stride=2)
        self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
        """x [B*T,C,H,W], guidance [B,G,2H,2W] (its image's, repeated per class) -> [B*T,out,2H,2W]."""
        x = self.up(x)
        if guidance is not None:
            x = torch.cat([x, guidance.repeat_interleave(x.shape[0] // guidance.shape[0], dim=0)], dim=1)
        return self.conv(x)


class Aggregator(nn.Module):
    """The cost volume, its aggregation and the upsampling decoder (defaults: CAT-Seg ViT-B/16's)."""

    def __init__(self, text_guidance_dim=512, text_guidance_proj_dim=128, appearance_guidance_dim=512,
                 appearance_guidance_proj_dim=128, decoder_dims=(64, 32), decoder_guidance_dims=(256, 128),
                 decoder_guidance_proj_dims=(32, 16), num_layers=2, nheads=4, hidden_dim=128, pooling_size=(1, 1),
                 feature_resolution=(24, 24), window_size=12, prompt_channel=1, pad_len=256):
        super().__init__()
        self.layers = nn.ModuleList([
            AggregatorLayer(hidden_dim, text_guidance_proj_dim, appearance_guidance_proj_dim, nheads,
                            tuple(feature_resolution), tuple(pooling_size), window_size, pad_len)
            for _ in range(num_layers)])
        self.conv1 = nn.Conv2d(prompt_channel, hidden_dim, kernel_size=7, stride=1, padding=3)
        self.guidance_projection = nn.Sequential(
            nn.Conv2d(appearance_guidance_dim, appearance_guidance_proj_dim, 3, padding=1), nn.ReLU())
        self.text_guidance_projection = nn.Sequential(nn.Linear(text_guidance_dim, text_guidance_proj_dim), nn.ReLU())
        self.decoder_guidance_projection = nn.ModuleList([
            nn.Sequential(nn.Conv2d(d, dp, 3, padding=1), nn.ReLU())
            for d, dp in zip(decoder_guidance_dims, decoder_guidance_proj_dims)])
        self.decoder1 = Up(hidden_dim, decoder_dims[0], decoder_guidance_proj_dims[0])
        self.decoder2 = Up(decoder_dims[0], decoder_dims[1], decoder_guidance_proj_dims[1])
        self.head = nn.Conv2d(decoder_dims[1], 1, kernel_size=3, stride=1, padding=1)
        self.pad_len = pad_len

    def forward(self, img_feats: torch.Tensor, text_feats: torch.Tensor, appearance_guidance: list[torch.Tensor],
                class_chunk: int = 64) -> torch.Tensor:
        """img_feats [B,C,H,W], text_feats [B,T,P,C], appearance_guidance [res3 [B,C,H,W], res4
        [B,256,2H,2W], res5 [B,128,4H,4W]] -> logits [B,T,4H,4W]. With more than `pad_len` classes
        only the `pad_len` whose cost peaks highest are aggregated; the others get -100, as the
        authors do. The per-class stages run `class_chunk` classes at a time (memory)."""
        img = F.normalize(img_feats, dim=1)
        text = F.normalize(text_feats, dim=-1)
        corr = torch.einsum("bchw,btpc->bpthw", img, text)
        classes, total = None, text.shape[1]
        if self.pad_len > 0 and total > self.pad_len:
            peak = corr.permute(0, 2, 1, 3, 4).flatten(-3).max(dim=-1)[0]  # [B,T]
            classes = peak.topk(self.pad_len, dim=-1, sorted=False)[1]
            text = torch.gather(text, 1, classes[..., None, None].expand(-1, -1, text.shape[-2], text.shape[-1]))
            corr = torch.einsum("bchw,btpc->bpthw", img, text)
        b, p, t, h, w = corr.shape
        embed = self.conv1(corr.transpose(1, 2).reshape(b * t, p, h, w))
        embed = embed.view(b, t, -1, h, w).transpose(1, 2)  # [B,C,T,H,W]
        guidance = self.guidance_projection(appearance_guidance[0])
        decoder_guidance = [proj(g) for proj, g in zip(self.decoder_guidance_projection, appearance_guidance[1:])]
        text_guidance = self.text_guidance_projection(F.normalize(text.mean(dim=-2), dim=-1))
        for layer in self.layers:
            embed = layer(embed, guidance, text_guidance, class_chunk)
        logit = torch.cat([self._decode(embed[:, :, s:s + class_chunk], decoder_guidance)
                           for s in range(0, t, class_chunk)], dim=1)
        if classes is not None:
            out = logit.new_full((b, total, logit.shape[2], logit.shape[3]), -100.0)
            logit = out.scatter_(1, classes[..., None, None].expand(-1, -1, logit.shape[-2], logit.shape[-1]), logit)
        return logit

    def _decode(self, embed: torch.Tensor, guidance: list[torch.Tensor]) -> torch.Tensor:
        """[B,C,t,H,W] -> [B,t,4H,4W]."""
        b, c, t, h, w = embed.shape
        x = embed.transpose(1, 2).reshape(b * t, c, h, w)
        x = self.head(self.decoder2(self.decoder1(x, guidance[0]), guidance[1]))
        return x.view(b, t, x.shape[-2], x.shape[-1])
