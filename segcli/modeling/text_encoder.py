"""Frozen open_clip text tower with its tokenizer (the BPE vocabulary ships inside open_clip)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import QuickGELU, TextTransformer
from torch import nn

from segcli.errors import SegcliError
from segcli.modeling.configs import TextConfig

_TOKENIZER: SimpleTokenizer | None = None


def _tokenizer() -> SimpleTokenizer:
    global _TOKENIZER
    if _TOKENIZER is None:  # building the BPE tables takes ~0.3 s: once per process
        _TOKENIZER = SimpleTokenizer()
    return _TOKENIZER


class TextEncoder(nn.Module):
    """Texts -> L2-normalised embeddings [N, C]. Frozen: no gradients, always in eval mode."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.context_length = cfg.context_length
        self.tower = TextTransformer(
            context_length=cfg.context_length,
            vocab_size=cfg.vocab_size,
            width=cfg.width,
            heads=cfg.heads,
            layers=cfg.layers,
            output_dim=cfg.embed_dim,
            act_layer=QuickGELU if cfg.quick_gelu else nn.GELU,
        )
        self.tower.requires_grad_(False)
        self.tower.eval()

    def train(self, mode: bool = True) -> "TextEncoder":
        return super().train(False)  # frozen for real: dropout and friends never switch on

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """[N, context_length] int64; refuses texts that would be truncated."""
        tok = _tokenizer()
        for text in texts:
            if len(tok.encode(text)) > self.context_length - 2:
                raise SegcliError(f"label {text[:40]!r}... is too long for the text encoder")
        return tok(texts, context_length=self.context_length)

    @torch.no_grad()
    def forward(self, texts: list[str]) -> torch.Tensor:
        device = self.tower.positional_embedding.device
        tokens = self.tokenize(texts).to(device)
        with torch.autocast(device.type, enabled=False):
            return F.normalize(self._encode(tokens).float(), dim=-1)

    def _encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, context_length] tokens -> [N, C], the tower's pooled output. A causal tower reads the
        end token's embedding from the positions up to it only, so the batch runs only up to its
        longest text's end (typically 10-20 of 77 positions: several times less work, the same sums)."""
        t = self.tower
        plain = (t.cls_emb is None and not getattr(t, "use_pad_mask", False) and t.attn_mask is not None
                 and t.pool_type == "argmax")
        if not plain:  # another tower layout: run it as it is
            return t(tokens)
        ends = tokens.argmax(dim=-1)  # the end token has the largest id, as open_clip's argmax pooling assumes
        length = int(ends.max()) + 1
        x = t.token_embedding(tokens[:, :length]) + t.positional_embedding[:length]
        x = t.ln_final(t.transformer(x, attn_mask=t.attn_mask[:length, :length]))
        pooled = x[torch.arange(x.shape[0], device=x.device), ends]
        return t.text_projection(pooled) if isinstance(t.text_projection, nn.Linear) else pooled @ t.text_projection
