"""How official LSeg state-dict keys (../shared/lseg) map onto segcli's module names.

The structure is the same one to one; only names differ. Used by `segcli convert` and tested
against the documented key/shape listings.
"""

from __future__ import annotations

import re

# Present in LSeg checkpoints, never used by LSeg's forward pass (CLIP's image tower, CLIP's learned
# scale, the ViT's final norm and ImageNet head, and the skip unit of the coarsest fusion block).
UNUSED_LSEG_KEYS = (
    "net.clip_pretrained.visual.",
    "net.clip_pretrained.logit_scale",
    "net.pretrained.model.norm.",
    "net.pretrained.model.head.",
    "net.scratch.refinenet4.resConfUnit1.",
)

_RULES = [
    (r"net\.pretrained\.model\.(.+)", r"image_encoder.vit.\1"),
    (r"net\.pretrained\.act_postprocess(\d)\.0\.project\.0\.(weight|bias)", "decoder.reassemble.{0}.readout.\\2"),
    (r"net\.pretrained\.act_postprocess(\d)\.3\.(weight|bias)", "decoder.reassemble.{0}.project.\\2"),
    (r"net\.pretrained\.act_postprocess(\d)\.4\.(weight|bias)", "decoder.reassemble.{0}.resample.\\2"),
    (r"net\.scratch\.layer(\d)_rn\.weight", "decoder.layer_rn.{0}.weight"),
    (r"net\.scratch\.refinenet(\d)\.resConfUnit1\.(.+)", "decoder.fusion.{0}.skip_unit.\\2"),
    (r"net\.scratch\.refinenet(\d)\.resConfUnit2\.(.+)", "decoder.fusion.{0}.residual_unit.\\2"),
    (r"net\.scratch\.refinenet(\d)\.out_conv\.(.+)", "decoder.fusion.{0}.out_conv.\\2"),
    (r"net\.scratch\.head1\.(weight|bias)", r"decoder.head.\1"),
    (r"net\.clip_pretrained\.(.+)", r"text_encoder.tower.\1"),
]
_COMPILED = [(re.compile(pattern + r"$"), template) for pattern, template in _RULES]


def lseg_to_segcli_key(key: str) -> str | None:
    """segcli state-dict key for an LSeg key (with or without the Lightning "net." prefix); None if unused."""
    if not key.startswith("net."):
        key = "net." + key
    if key.startswith(UNUSED_LSEG_KEYS):
        return None
    for pattern, template in _COMPILED:
        m = pattern.match(key)
        if m:
            level = str(int(m.group(1)) - 1) if "{0}" in template else ""
            return m.expand(template.replace("{0}", level))
    raise KeyError(f"unexpected key in LSeg checkpoint: {key}")
