"""The direct baselines of Eqn. 6 (Sec. 4.2): a random φ trained against the old model's embeddings of the pairs."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..finetune import FinetuneConfig, TrainPlan
from .registry import MethodSpec, register_method


@dataclass(frozen=True)
class DirectConfig:
    finetune: FinetuneConfig = field(
        default_factory=FinetuneConfig, metadata={"help": "training on the pairs (Eqn. 6)"}
    )


def direct_needs(cfg: DirectConfig) -> tuple[str, ...]:
    """The old model's embeddings of the pairs: Eqn. 6's targets."""
    return ("v_old_pairs", "w_old_pairs")


def register() -> None:
    """Register this family's methods (methods/__init__.py calls it, in cost-tie order)."""
    common = dict(family="direct", config_cls=DirectConfig, needs=direct_needs)
    register_method(
        MethodSpec(
            name="base",
            **common,
            cost=2,
            portfolio=True,
            summary="Base (Eqn. 6): LoRA, vision prompts and a random φ against the old model's pair embeddings",
            trains="LoRA (both towers), vision prompts, all of φ",
            bundle="φ, LoRA adapter, vision prompts",
            plan=TrainPlan(loss="eqn6", lora=True, prompts=True, head="all"),
        )
    )
    register_method(
        MethodSpec(
            name="lora-only",
            **common,
            cost=2,
            summary="LoRA-only (Eqn. 6): Base without the vision prompts",
            trains="LoRA (both towers), all of φ",
            bundle="φ, LoRA adapter",
            plan=TrainPlan(loss="eqn6", lora=True, prompts=False, head="all"),
        )
    )
    register_method(
        MethodSpec(
            name="full-tune",
            **common,
            cost=3,
            summary="Full-tune (Eqn. 6): every weight of the new encoders and a random φ",
            trains="every encoder weight, all of φ",
            bundle="φ, the whole fine-tuned new model",
            plan=TrainPlan(loss="eqn6", lora=False, prompts=False, head="all", full=True),
        )
    )
