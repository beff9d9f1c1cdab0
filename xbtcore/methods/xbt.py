"""XBT (Sec. 3): φ pretrained on text (Eqn. 3), then LoRA, vision prompts and φ's LayerNorms (Eqn. 5)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..finetune import FinetuneConfig, TrainPlan
from ..pretrain import PretrainConfig, pair_rows, pretrain_phi, pretraining_rows, source_parts
from .registry import HeadInputs, MethodSpec, register_method


@dataclass(frozen=True)
class XbtConfig:
    pretrain: PretrainConfig = field(default_factory=PretrainConfig, metadata={"help": "φ's pretraining (Eqn. 3)"})
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig, metadata={"help": "XBT training (Eqn. 5)"})


def xbt_needs(cfg: XbtConfig) -> tuple[str, ...]:
    """φ's pretraining rows (corpus texts and/or the pairs' images, `PretrainConfig.source`), and the
    pairs by the new model for the pair term (`PretrainConfig.pair_weight`)."""
    parts = source_parts(cfg.pretrain.source)
    needs = [*(["w_new", "w_old"] if "text" in parts else []), *(["v_new_pairs", "v_old_pairs"] if "image" in parts else [])]
    if cfg.pretrain.pair_weight:
        needs += [n for n in ("v_new_pairs", "w_new_pairs") if n not in needs]
    return tuple(needs)


def text_pretrained_phi(inputs: HeadInputs, cfg: XbtConfig):
    """Eqn. 3 on the rows `PretrainConfig.source` names, with the pair term when λ > 0 -> φ."""
    pre = replace(cfg.pretrain, seed=inputs.seed)
    rows = pretraining_rows(
        pre.source,
        text=(inputs.frozen("w_new"), inputs.frozen("w_old")) if "text" in source_parts(pre.source) else None,
        image=(inputs.frozen("v_new_pairs"), inputs.frozen("v_old_pairs")) if pre.uses_images else None,
    )
    pairs = None
    if pre.pair_weight:
        pairs = pair_rows(inputs.frozen("v_new_pairs"), inputs.frozen("w_new_pairs"), inputs.caption_image)
    phi, _ = pretrain_phi(*rows, pre, device=inputs.device, on_step=inputs.on_step, pairs=pairs)
    return phi


register_method(MethodSpec(
    name="xbt",
    family="xbt",
    summary="XBT (the paper): φ pretrained on text (Eqn. 3), then Eqn. 5 on the pairs; no old model in training",
    config_cls=XbtConfig,
    needs=xbt_needs,
    cost=2,
    trains="φ on cached text embeddings; then LoRA (both towers), vision prompts, φ's LayerNorms",
    bundle="φ, LoRA adapter, vision prompts",
    fit_head=text_pretrained_phi,
    plan=TrainPlan(loss="eqn5", lora=True, prompts=True, head="layernorm"),
))
