"""The `xbt-upgrade` flow: old model + new model + data -> a gated, registered compatible query encoder.

    check inputs -> extract corpus -> embed (frozen, cached) -> fit the method's head (XBT: Eqn. 3)
    -> train (XBT: Eqn. 5, or a baseline) -> evaluate (CONTRACT.md cases) -> Eqn. 2 gate
    -> MLflow register (+ promote) -> report (JSON, HTML) -> catalog

Every step is a task in tasks/, called here in order; the method is read from
the registry (xbtcore.methods). A finished step is cached on its inputs, which
carry the fingerprints of the files they read, and writes to a path named by
them (`step_path`), so re-running the same upgrade skips it and a run with
other settings in the same folder never serves another's output.
"""

from __future__ import annotations

import dataclasses
import os
import time
from contextlib import contextmanager
from pathlib import Path

from prefect import flow, runtime
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks.advice import next_steps
from tasks.common import absolute_ref, cache_dir, digest, fingerprint_content, fingerprint_files, state_dir, step_path
from tasks.embed import embed_frozen
from tasks.common import read_json
from tasks.evaluate import check_inputs, evaluate, gate
from tasks.extract import ensure_world, extract_corpus
from tasks.registry import attach_report, register_and_promote, resolve_model, space_of
from tasks.report import (build_report, draw_figures, publish_artifacts, read_histories, record_datasets, record_run,
                          step_states, write_report)
from tasks.servers import check_servers
from tasks.train import fit_head, publish_bundle, train
from worlds import shapes
from xbtcore.config import Settings, apply_overrides
from xbtcore.data import check_output, parquet_files
from xbtcore.finetune import FinetuneConfig
from xbtcore.methods import get_method
from xbtcore.pretrain import PretrainConfig

STEPS = ("extract", "embed", "pretrain", "train", "evaluate")  # report.json's timings_s

# The demo's built-in world: half the benchmark world's corpus (115k rows, ~104k distinct).
# φ takes the same number of steps either way (PretrainConfig.min_steps), and embedding
# half the corpus saves a minute (docs/method.md).
DEMO_WORLD = {"corpus_captions": 115_000}


class UpgradeParams(BaseModel):
    """Everything an upgrade depends on; checked before any step runs."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    old: str = Field("zoo/old", description="the model the gallery was embedded with: HF id/dir, bundle, or models:/ URI")
    new: str = Field("zoo/new", description="the new model: HF id or directory")
    corpus: str | None = Field(None, description="text corpus Parquet (file, folder or glob); none: the built-in world")
    pairs: str | None = Field(None, description="image-text pairs Parquet")
    eval: str | None = Field(None, description="eval set Parquet")
    out: str = Field("out/upgrade", description="run folder: report.json, report.html, bundle/, work/")
    method: str = Field("xbt", description="a registered method (`xbt methods`)")
    seed: int = Field(0, ge=0)
    text_column: str = Field("caption", min_length=1)
    min_chars: int | None = Field(None, ge=1, description="drop corpus texts shorter than this")
    max_chars: int | None = Field(None, ge=1, description="drop corpus texts longer than this")
    sample: int | None = Field(None, ge=2, description="keep at most this many corpus texts (seeded)")
    gate_ks: list[int] = Field(default_factory=lambda: [1, 5, 10], min_length=1)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig, description="φ's pretraining (Eqn. 3)")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="training on the pairs")
    world: dict[str, int | float] = Field(default_factory=lambda: dict(DEMO_WORLD), description="WorldSpec overrides for the built-in world")
    progress: bool = True

    @field_validator("pretrain", "finetune", mode="before")
    @classmethod
    def _settings(cls, v, info):
        """A dict of overrides ({"epochs": 5}, {"lora.rank": 8}) on the defaults; unknown keys and bad values fail here."""
        if isinstance(v, dict):
            return apply_overrides({"pretrain": PretrainConfig, "finetune": FinetuneConfig}[info.field_name](), v)
        return v

    @field_validator("method")
    @classmethod
    def _method(cls, v):
        get_method(v)  # an unknown name fails here, naming the registered ones
        return v

    @field_validator("corpus", "pairs", "eval")
    @classmethod
    def _data_exists(cls, v):
        if v is not None:
            parquet_files(v)  # InputError (a ValueError) naming the path
        return v

    @field_validator("out")
    @classmethod
    def _out_writable(cls, v):
        check_output(v, folder=True)  # a file in the way or a read-only folder fails now, not after training
        return v

    @field_validator("old", "new")
    @classmethod
    def _model_ref(cls, v: str):
        looks_local = v.startswith((".", "/", "~")) or v.count("/") != 1
        if not v.startswith("models:/") and looks_local and not Path(v).expanduser().exists():
            raise ValueError(f"model directory '{v}' does not exist: pass a Hugging Face directory, a hub id, "
                             "a bundle (DIR/bundle) or models:/NAME@champion")
        return v

    @field_validator("gate_ks")
    @classmethod
    def _ks(cls, v):
        if any(k < 1 for k in v):
            raise ValueError(f"gate K values must be >= 1, got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        given = [self.corpus is not None, self.pairs is not None, self.eval is not None]
        if any(given) and not all(given):
            raise ValueError("pass all of corpus, pairs and eval, or none of them (the built-in world)")
        if self.min_chars and self.max_chars and self.min_chars > self.max_chars:
            raise ValueError(f"min_chars {self.min_chars} > max_chars {self.max_chars}")
        world_fields = {f.name for f in dataclasses.fields(shapes.WorldSpec)}
        if set(self.world) - world_fields:
            raise ValueError(f"unknown world settings {sorted(set(self.world) - world_fields)}; known: {sorted(world_fields)}")
        shapes.WorldSpec(**self.world)  # a fractional row count fails here, not in the world writer
        return self

    @property
    def settings(self) -> Settings:
        return Settings(pretrain=self.pretrain, finetune=self.finetune)


class StepClock:
    """Wall time per report step (report.json's timings_s)."""

    def __init__(self):
        self.seconds = dict.fromkeys(STEPS, 0.0)

    @contextmanager
    def __call__(self, step: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[step] = round(self.seconds[step] + time.perf_counter() - t0, 3)


def model_fingerprint(ref: str) -> str:
    """A local model's files, or a hub id as it is: what keys the steps that read the model."""
    return fingerprint_files([ref]) if Path(ref).exists() else ref


@flow(name="xbt-upgrade", log_prints=True)
def upgrade(params: UpgradeParams) -> dict:
    """One upgrade; writes OUT/report.json, OUT/report.html and OUT/bundle/, registers the bundle in MLflow."""
    check_servers()
    out = Path(params.out).expanduser().absolute()
    work = out / "work"
    cache_root = str(cache_dir())
    clock = StepClock()
    spec, settings = get_method(params.method), params.settings
    method_cfg = spec.config(settings)

    if params.corpus is None:
        world = dataclasses.asdict(shapes.WorldSpec(**params.world))
        data = ensure_world(world, str(state_dir() / f"world-{digest(world)}"))
    else:
        data = {"corpus": params.corpus, "pairs": params.pairs, "eval": params.eval}
    data_fp = {k: fingerprint_files(parquet_files(v)) for k, v in data.items()}
    old = absolute_ref(resolve_model(params.old))
    new = absolute_ref(resolve_model(params.new))
    model_fp = {"old": model_fingerprint(old), "new": model_fingerprint(new)}

    with clock("extract"):  # bad input of any kind fails here, before anything trains
        inputs = check_inputs(old, new, data["pairs"], data["eval"], fingerprint=digest(data_fp, model_fp))
        corpus_filter = (params.text_column, params.min_chars, params.max_chars, params.sample, params.seed)
        corpus = extract_corpus(data["corpus"], step_path(work, "corpus", data_fp["corpus"], corpus_filter, suffix=".parquet"),
                                *corpus_filter, fingerprint=data_fp["corpus"])
    root, prev = inputs["root"], inputs["prev"]
    # "old" in Eqns. 3 and 6 is the old model; in a chain link the gallery's root model, or with
    # pretrain.chain_targets=champion the champion's compatible space (its bundle).
    targets = root if prev is not None and settings.pretrain.chain_targets == "root" else old
    needs = list(spec.needs(method_cfg))
    pairs_read = data["pairs"] if any(n.endswith("_pairs") for n in needs) else None
    embedded_fp = digest(corpus["fingerprint"], data_fp["pairs"] if pairs_read else "", model_fp, model_fingerprint(targets))
    with clock("embed"):
        embeddings = embed_frozen(needs, corpus["path"], pairs_read, targets, new, cache_root, fingerprint=embedded_fp,
                                  progress=params.progress)

    head = None
    if spec.fit_head is not None:
        head_inputs = (params.method, settings, embeddings, data_fp["pairs"], params.seed, targets != root)
        with clock("pretrain"):
            head = fit_head(params.method, settings, embeddings, cache_root, data["pairs"], inputs["new_dim"],
                            inputs["old_dim"], params.seed, step_path(work, "head", *head_inputs, suffix=".safetensors"),
                            compatible_targets=targets != root)
    lineage = {"new": new, "old": old, "root": root, "chain": inputs["chain"] if prev else [root]}
    with clock("train"):
        trained = train(params.method, settings, head, embeddings, cache_root, data["pairs"], lineage, params.seed,
                        step_path(work, "bundle", params.method, settings, embeddings, data_fp["pairs"], model_fp,
                                  fingerprint_content(head) if head else "", lineage, params.seed),
                        progress=params.progress)
    bundle = publish_bundle(trained, str(out / "bundle"))

    with clock("evaluate"):
        evaluated = evaluate(data["eval"], root, new, bundle, prev, cache_root,
                             step_path(work, "evaluate", data_fp["eval"], model_fp, fingerprint_content(bundle), prev))
    recall = read_json(Path(evaluated) / "recall.json")
    verdict = gate(recall, params.gate_ks, prev is not None)

    run = {"method": params.method, "old": params.old, "new": params.new,
           "counts": {"corpus": corpus["rows"], "pairs": inputs["pairs"], "eval_images": inputs["eval_images"],
                      "eval_captions": inputs["eval_captions"]},
           "timings_s": dict(clock.seconds), "bundle": bundle, "space": space_of(root),
           "config": {"seed": params.seed, **dataclasses.asdict(method_cfg), "text_column": params.text_column,
                      "data": data}}
    histories = read_histories({"pretrain": head, "train": trained})
    figures = draw_figures(histories, recall, str(work / "figures"))
    reg = register_and_promote(run, recall, bundle, root, verdict, histories, figures)
    failures = [f for k, v in verdict.items() if k != "passed" for f in v["failures"]]
    promotion = {
        "promoted": reg["promoted"], "model": reg["name"], "version": reg["version"], "champion": reg["champion"],
        "reason": "gate passed: champion moved to this version" if reg["promoted"]
        else f"gate failed ({len(failures)} failing checks): not promoted, champion stays "
        + (f"version {reg['champion']}" if reg["champion"] is not None else "unset (no version has passed yet)"),
    }
    run["mlflow"] = {"experiment": reg["experiment"], "run_id": reg["run_id"], "uri": reg["uri"]}
    run["steps"] = step_states()
    margins = read_json(Path(evaluated) / "gate_margins.json")
    advice = next_steps({"method": params.method, "gate": verdict["eqn2"], "gate_margins": margins, "recall": recall,
                         "no_regression": verdict.get("no_regression")}, settings.pretrain)
    report = build_report(run, recall, verdict, margins, promotion, advice)
    written = write_report(report, data["eval"], str(Path(evaluated) / "sample.safetensors"), str(out))
    if reg["new_run"]:
        attach_report(reg["run_id"], [written["json"], written["html"]])
    publish_artifacts(report, verdict, written["html"])
    record_datasets([{"path": os.path.abspath(data[k]), "kind": k, "fingerprint": data_fp[k], "rows": n}
                     for k, n in (("corpus", corpus["rows"]), ("pairs", inputs["pairs"]), ("eval", inputs["eval_captions"]))])
    run_id = str(runtime.flow_run.id or digest(written["json"], time.time()))
    record_run({"run_id": run_id, "method": params.method, "old": old, "new": new, "root_model": root,
                "space": run["space"], "out_dir": str(out), "bundle": bundle, "gate_passed": verdict["passed"],
                "promoted": reg["promoted"], "mlflow_model": reg["name"], "mlflow_version": reg["version"],
                "report": written["json"]}, run["space"], root, inputs["old_dim"])
    return report
