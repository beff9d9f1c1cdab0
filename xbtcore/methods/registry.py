"""The method registry: every upgrade method registered once, with what it trains and costs.

As PEFT registers a method (`register_peft_method(name=..., config_cls=...,
model_cls=...)`), each family module here calls `register_method` for its
methods; the CLI's choices, the flow, the report, the advice and the benches
read `METHODS`. A method is at most two stages:

    head   fit a head (φ or a linear map) on cached frozen embeddings        (no encoder runs)
    plan   fine-tune the new encoders with the head (`finetune.TrainPlan`)   (LoRA, prompts, weights)

and its bundle holds the head, plus the adapters or weights its plan trained.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from ..finetune import TrainPlan

# Frozen embeddings a method may read (the embed step computes only what it names):
# w_new / w_old the corpus texts by the new / old text tower; v_new_pairs / v_old_pairs
# the training pairs' distinct images by the new / old image tower (the old ones from the
# stored gallery where it holds them); w_new_pairs / w_old_pairs the training pairs'
# captions by the new / old text tower; *_val the same of the validation pairs.
PAIR_EMBEDDINGS = ("v_new_pairs", "v_old_pairs", "w_new_pairs", "w_old_pairs")
EMBEDDINGS = ("w_new", "w_old", *PAIR_EMBEDDINGS, *(n.replace("_pairs", "_val") for n in PAIR_EMBEDDINGS))

# What a method costs, cheapest first: the order `--method auto` tries candidates in.
COST_CLASSES = {
    0: "training-free: a map fitted in closed form on cached embeddings",
    1: "a head trained on cached embeddings; no encoder runs in training",
    2: "adapters (LoRA, prompts) trained on the new encoders",
    3: "every weight of the new encoders trained",
}


@dataclass
class HeadInputs:
    """What a head stage reads: cached frozen embeddings by name, the pairs' layout, seed."""

    frozen: Callable[[str], torch.Tensor]  # name in EMBEDDINGS -> (rows, D) embeddings
    caption_image: torch.Tensor | None  # (P,) the training pairs' caption -> distinct-image index
    seed: int
    val_caption_image: torch.Tensor | None = None  # (V,) the same of the validation pairs; None without a split
    on_step: Callable[[int, float], None] | None = None
    device: str = "cpu"
    checkpoint: Path | None = None  # where a head that trains keeps its resumable state


@dataclass(frozen=True)
class MethodSpec:
    name: str
    family: str  # the module that registers it
    summary: str  # one line: what it is, where it comes from
    config_cls: type  # its settings: a dataclass whose fields are settings scopes (pretrain, finetune, ...)
    needs: Callable[[object], tuple[str, ...]]  # config -> the frozen embeddings it reads, from EMBEDDINGS
    cost: int  # a key of COST_CLASSES
    trains: str  # what training changes
    bundle: str  # what its bundle holds beside the unmodified new model
    fit_head: Callable[[HeadInputs, object], torch.nn.Module] | None = None  # None: the plan starts from a random φ
    plan: TrainPlan | None = None  # None: no encoder is fine-tuned
    # a step on the fitted head before its bundle, without a plan (xbt-gallery-blend: its blend with the old
    # model's query, chosen on the validation pairs): (head, inputs) -> the head the bundle holds
    finish_head: Callable[[torch.nn.Module, HeadInputs], torch.nn.Module] | None = None
    old_encoder_at_query: bool = False  # a query also runs the old encoder
    portfolio: bool = False  # a candidate of `--method auto`
    pretrain_defaults: dict = field(default_factory=dict)  # φ pretraining values for the fields a user left None

    def __post_init__(self):
        assert self.cost in COST_CLASSES, self
        assert self.fit_head is not None or self.plan is not None, f"{self.name}: a method trains something"
        assert self.finish_head is None or (self.fit_head is not None and self.plan is None), self.name

    @property
    def scopes(self) -> tuple[str, ...]:
        """The scopes of settings this method reads (`--set SCOPE.KEY`): its config's fields."""
        return tuple(f.name for f in fields(self.config_cls))

    def config(self, settings) -> object:
        """This method's config from the run's parsed settings (each field is a scope of settings), with its own
        pretraining values where the user set none."""
        cfg = self.config_cls(**{scope: getattr(settings, scope) for scope in self.scopes})
        if self.pretrain_defaults and hasattr(cfg, "pretrain"):
            cfg = replace(cfg, pretrain=self.settle_pretrain(cfg.pretrain))
        return cfg

    def settle_pretrain(self, pretrain):
        """A PretrainConfig with this method's values for the fields left None."""
        unset = {k: v for k, v in self.pretrain_defaults.items() if getattr(pretrain, k) is None}
        return replace(pretrain, **unset) if unset else pretrain


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    assert spec.name not in METHODS, f"method {spec.name!r} is registered twice"
    METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)} (`xbt methods` lists them)")
    return METHODS[name]


def head_owner(name: str) -> str:
    """The cheapest method whose head is fitted by the same function, with the same pretraining values, as
    `name`'s: methods that share a head (xbt-gallery-lora starts from xbt-gallery's φ) fit it once."""
    spec = get_method(name)
    if spec.fit_head is None:
        return name
    same = (m for m in by_cost() if m.fit_head is spec.fit_head and m.pretrain_defaults == spec.pretrain_defaults)
    return next(same).name


def by_cost() -> list[MethodSpec]:
    """Every method, cheapest first (ties in registration order)."""
    return sorted(METHODS.values(), key=lambda m: m.cost)
