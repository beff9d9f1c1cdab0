"""Upgrade methods, one module per family, all in one registry (`METHODS`).

xbt.py      XBT: Eqn. 3 pretraining of φ, then Eqn. 5
direct.py   the Eqn. 6 baselines: Base, LoRA-only, Full-tune
maps.py     training-free maps: Procrustes, least squares
"""

from . import direct, maps, xbt
from .registry import (
    COST_CLASSES,
    EMBEDDINGS,
    METHODS,
    HeadInputs,
    MethodSpec,
    by_cost,
    get_method,
    head_owner,
    register_method,
)

__all__ = [
    "COST_CLASSES",
    "EMBEDDINGS",
    "METHODS",
    "HeadInputs",
    "MethodSpec",
    "by_cost",
    "get_method",
    "head_owner",
    "register_method",
]

for _family in (maps, xbt, direct):  # methods of equal cost are tried by `--method auto` in this order
    _family.register()
