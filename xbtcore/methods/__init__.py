"""Upgrade methods, one module per family, all in one registry (`METHODS`).

    xbt.py      XBT: Eqn. 3 pretraining of φ, then Eqn. 5
    direct.py   the Eqn. 6 baselines: Base, LoRA-only, Full-tune
    maps.py     training-free maps: Procrustes, least squares
"""

from . import direct, maps, xbt  # noqa: F401  (each registers its methods)
from .registry import COST_CLASSES, EMBEDDINGS, METHODS, HeadInputs, MethodSpec, by_cost, get_method, register_method

__all__ = ["COST_CLASSES", "EMBEDDINGS", "METHODS", "HeadInputs", "MethodSpec", "by_cost", "get_method",
           "register_method"]
