"""An upgrade's settings, one config per concern, parsed once for the CLI, the flow and the benchmarks.

    parse_settings(["pretrain.sigma=0.05", "finetune.lora.rank=8"])
        -> {"pretrain": {"sigma": 0.05}, "finetune": {"lora.rank": 8}}
    apply_overrides(FinetuneConfig(), {"lora.rank": 8}) -> FinetuneConfig(lora=LoraSettings(rank=8, ...))
    Settings.of(parse_settings([...])) -> Settings(pretrain=PretrainConfig(sigma=0.05), finetune=...)

A method reads the scopes its config names (`methods.MethodSpec.config`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from .finetune import FinetuneConfig
from .pretrain import PretrainConfig


@dataclass(frozen=True)
class Settings:
    """Every concern's config; `--set SCOPE.FIELD=VALUE` reaches SCOPE."""

    pretrain: PretrainConfig = field(default_factory=PretrainConfig, metadata={"help": "φ's pretraining (Eqn. 3)"})
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig, metadata={"help": "training on the pairs"})

    @classmethod
    def of(cls, overrides: dict[str, dict]) -> "Settings":
        """{scope: {field: value}} -> Settings; an unknown scope, field or a bad value is a ValueError naming it."""
        unknown = sorted(set(overrides) - set(SCOPES))
        if unknown:
            raise ValueError(f"unknown settings scope {unknown[0]!r}; use one of {', '.join(SCOPES)}")
        return cls(**{scope: apply_overrides(cls_(), overrides.get(scope, {})) for scope, cls_ in SCOPES.items()})


SCOPES = {f.name: f.default_factory for f in dataclasses.fields(Settings)}


def parse_settings(items: list[str]) -> dict[str, dict]:
    """["SCOPE.FIELD=VALUE", ...] -> {scope: {field: value}}; values are JSON where they parse, else strings."""
    out: dict[str, dict] = {scope: {} for scope in SCOPES}
    for kv in items:
        key, sep, value = kv.partition("=")
        scope, _, field = key.partition(".")
        if not sep or scope not in out or not field:
            raise ValueError(f"--set {kv!r}: use SCOPE.FIELD=VALUE with SCOPE one of {', '.join(SCOPES)}")
        try:
            out[scope][field] = json.loads(value)
        except json.JSONDecodeError:
            out[scope][field] = value
    return out


def apply_overrides(cfg, overrides: dict):
    """A config dataclass with `overrides` applied; dotted keys reach nested configs ("lora.rank")."""
    types = {f.name: str(f.type) for f in dataclasses.fields(cfg)}
    fields = set(types)
    changes: dict = {}
    nested: dict[str, dict] = {}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head not in fields:
            raise ValueError(f"unknown setting {key!r} for {type(cfg).__name__}; known: {sorted(fields)}")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            current = getattr(cfg, head)
            numeric = any(t in types[head].split(" | ") for t in ("int", "float"))
            if numeric and (isinstance(value, bool) or not isinstance(value, (int, float, type(None)))):
                raise ValueError(f"setting {key!r} of {type(cfg).__name__} takes a number, got {value!r}")
            if isinstance(current, str) and not isinstance(value, str):
                value = str(value)
            changes[head] = tuple(value) if isinstance(current, tuple) else value
    for head, sub in nested.items():
        changes[head] = apply_overrides(getattr(cfg, head), sub)
    return dataclasses.replace(cfg, **changes)
