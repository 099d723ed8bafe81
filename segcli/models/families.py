"""The model families, as a table (this module never imports torch; the rows' hooks import on use).

A family (`lseg`, `clip-dense`, `catseg`) is a row of FAMILIES: its config class (segcli.modeling.configs),
its nn.Module and the function that maps foreign weights (an official LSeg .ckpt, open_clip CLIP
weights) onto it. A checkpoint records its family, so loading it needs no code of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from segcli.errors import SegcliError
from segcli.modeling.configs import CATSegConfig, CLIPDenseConfig, LSegConfig

DEFAULT_MODEL = "clip-dense:ViT-B-16"  # training-free, so predict works with no --model


def _lseg_module() -> type:
    from segcli.modeling.lseg import LSeg

    return LSeg


def _clip_dense_module() -> type:
    from segcli.modeling.clip_dense import CLIPDense

    return CLIPDense


def _lseg_from_foreign(state: dict, name: str):
    from segcli.models.lseg_weights import lseg_from_foreign

    return lseg_from_foreign(state, name)


def _clip_dense_from_foreign(state: dict, name: str):
    from segcli.models.clip_weights import clip_dense_from_foreign

    return clip_dense_from_foreign(state, name)


def _catseg_module() -> type:
    from segcli.modeling.catseg import CATSeg

    return CATSeg


@dataclass(frozen=True)
class Family:
    """One model family: how its config, module and foreign weights fit together.

    `module()` gives the nn.Module class; `from_foreign(state_dict, name)` returns (model, the labels
    it was trained on or None), or None when the weights are not this family's. Both import torch
    on use.
    """

    name: str
    config: type
    module: Callable[[], type]
    summary: str
    from_foreign: Callable | None = None
    trainable: bool = False

    def model_class(self) -> type:
        return self.module()

    def try_foreign(self, state: dict, name: str):
        return self.from_foreign(state, name) if self.from_foreign else None


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("lseg", LSegConfig, _lseg_module,
               "LSeg: ViT image encoder + DPT decoder, trained, with a frozen CLIP text tower",
               from_foreign=_lseg_from_foreign, trainable=True),
        Family("clip-dense", CLIPDenseConfig, _clip_dense_module,
               "training-free dense CLIP (ClearCLIP-style last block) with CLIP's text tower",
               from_foreign=_clip_dense_from_foreign),
        Family("catseg", CATSegConfig, _catseg_module,
               "CAT-Seg: fine-tuned CLIP with cost aggregation (trained open-vocabulary, COCO-Stuff)"),
    ]
}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise SegcliError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)}): "
                          "written by a newer segcli?") from None
