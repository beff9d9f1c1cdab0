"""The `xbt-upgrade` flow: old model + new model + data -> a gated, registered compatible query encoder.

    check inputs -> extract corpus -> embed (cache) -> pretrain φ (Eqn. 3) -> train (Eqn. 5 or a baseline)
    -> evaluate (CONTRACT.md cases) -> Eqn. 2 gate -> report (JSON, HTML) -> MLflow register (+ promote) -> catalog

Every step is a task in tasks/; this module only composes them. Finished steps
are cached on their inputs (which carry the fingerprints of the files they
read) and code, so re-running the same upgrade skips them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, runtime, task
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks.advice import next_steps
from tasks.common import (CACHED, absolute_ref, cache_dir, digest, fingerprint_content, fingerprint_files, results_dir,
                          state_dir)
from tasks.embed import embed_corpus, embeddings_needed
from tasks.evaluate import check_inputs, evaluate, gate, margins_path
from tasks.extract import extract_corpus
from tasks.registry import register_and_promote, resolve_model, space_of
from tasks.report import draw_figures, publish_artifacts, record_datasets, record_run, write_html_report, write_report
from tasks.servers import check_servers
from tasks.train import pretrain, train
from worlds import shapes
from xbtcore.config import apply_overrides
from xbtcore.data import check_output, parquet_files
from xbtcore.finetune import METHODS, FinetuneConfig
from xbtcore.linear_bundle import LINEAR_METHODS
from xbtcore.pretrain import PretrainConfig

METHOD_NAMES = (*METHODS, *LINEAR_METHODS)
Method = Literal["xbt", "base", "lora-only", "full-tune", "procrustes", "lstsq"]
assert set(Method.__args__) == set(METHOD_NAMES), "Method must list every xbtcore method"
STEPS = ("extract", "embed", "pretrain", "train", "evaluate")


# The demo's built-in world: half the benchmark world's corpus (115k rows, ~104k distinct).
# φ takes the same number of steps either way (PretrainConfig.min_steps) and matched
# the full corpus within noise (docs/method.md); embedding half the corpus saves a minute.
DEMO_WORLD = {"corpus_captions": 115_000}


class UpgradeParams(BaseModel):
    """Everything an upgrade depends on; checked before any step runs."""

    model_config = ConfigDict(extra="forbid")

    old: str = Field("zoo/old", description="the model the gallery was embedded with: HF id/dir, bundle, or models:/ URI")
    new: str = Field("zoo/new", description="the new model: HF id or directory")
    corpus: str | None = Field(None, description="text corpus Parquet (file, folder or glob); none: the built-in world")
    pairs: str | None = Field(None, description="image-text pairs Parquet")
    eval: str | None = Field(None, description="eval set Parquet")
    out: str = Field("out/upgrade", description="run folder: report.json, bundle/, work/")
    method: Method = "xbt"
    seed: int = Field(0, ge=0)
    text_column: str = Field("caption", min_length=1)
    min_chars: int | None = Field(None, ge=1, description="drop corpus texts shorter than this")
    max_chars: int | None = Field(None, ge=1, description="drop corpus texts longer than this")
    sample: int | None = Field(None, ge=2, description="keep at most this many corpus texts (seeded)")
    gate_ks: list[int] = Field(default_factory=lambda: [1, 5, 10], min_length=1)
    pretrain: dict[str, Any] = Field(default_factory=dict, description="PretrainConfig overrides, e.g. {'epochs': 5}")
    finetune: dict[str, Any] = Field(default_factory=dict, description="FinetuneConfig overrides ('lora.rank': 8)")
    world: dict[str, int | float] = Field(default_factory=lambda: dict(DEMO_WORLD), description="WorldSpec overrides for the built-in world")
    progress: bool = True

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
        apply_overrides(PretrainConfig(), self.pretrain)  # unknown keys and bad values fail here
        apply_overrides(FinetuneConfig(), self.finetune)
        world_fields = {f.name for f in dataclasses.fields(shapes.WorldSpec)}
        if set(self.world) - world_fields:
            raise ValueError(f"unknown world settings {sorted(set(self.world) - world_fields)}; known: {sorted(world_fields)}")
        shapes.WorldSpec(**self.world)  # a fractional row count fails here, not in the world writer
        return self


@task(name="ensure-world", **CACHED)
def ensure_world(spec: dict, out_dir: str) -> dict:
    """The built-in world, written once per spec under the state folder."""
    paths = {k: str(Path(out_dir) / f"{k}.parquet") for k in ("corpus", "pairs", "eval")}
    if all(Path(p).exists() for p in paths.values()):
        return paths
    return shapes.write_world(out_dir, shapes.WorldSpec(**spec))


class _Steps:
    """Runs tasks, adds their wall time to a report step, remembers each task's final state."""

    def __init__(self, keys_dir: Path):
        self.timings = {s: 0.0 for s in STEPS}
        self.states: dict[str, str] = {}
        self.log = get_run_logger()
        self.keys_dir = keys_dir  # which inputs last wrote each step's output (see __call__)

    def __call__(self, step: str | None, t, *args, produces=None, **kw):
        t = t.with_options(result_storage=results_dir()) if t.cache_policy is not None and t.persist_result else t
        t0 = time.perf_counter()
        state = t(*args, return_state=True, **kw)
        result = state.result()
        if produces is not None:
            # A cached result is a path in the run folder. It is stale when the file is gone, or when a run
            # with other inputs has overwritten it since (change a setting, then change it back).
            record = self.keys_dir / f"{t.name}.key"
            key = digest(t.name, args, kw)
            written_by = record.read_text() if record.exists() else None
            if not Path(produces(result)).exists() or (state.name == "Cached" and written_by != key):
                state = t.with_options(refresh_cache=True)(*args, return_state=True, **kw)
                result = state.result()
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(key)
        seconds = time.perf_counter() - t0
        if step is not None:
            self.timings[step] = round(self.timings[step] + seconds, 3)
        self.states[t.name] = state.name
        self.log.info("%s: %s in %.2f s", t.name, state.name, seconds)
        return result


def _histories(work: Path) -> dict:
    out = {}
    for name, path in (("pretrain", work / "phi.history.json"), ("train", work / "train_history.json")):
        if path.exists():
            out[name] = json.loads(path.read_text())["steps"]
    return out


@flow(name="xbt-upgrade", log_prints=True)
def upgrade(params: UpgradeParams) -> dict:
    """One upgrade; writes OUT/report.json, OUT/report.html and OUT/bundle/, registers the bundle in MLflow."""
    check_servers()
    out = Path(params.out).expanduser().absolute()
    work = out / "work"
    run = _Steps(work / "keys")
    cache_root = str(cache_dir())

    if params.corpus is None:
        spec = dataclasses.asdict(shapes.WorldSpec(**params.world))
        data = run(None, ensure_world, spec, str(state_dir() / f"world-{digest(spec)}"), produces=lambda r: r["eval"])
    else:
        data = {"corpus": params.corpus, "pairs": params.pairs, "eval": params.eval}
    data_fp = {k: fingerprint_files(parquet_files(v)) for k, v in data.items()}
    old = absolute_ref(run(None, resolve_model, params.old))
    new = absolute_ref(run(None, resolve_model, params.new))
    def ref_fp(ref: str) -> str:  # a local model's files, or a hub id as it is
        return fingerprint_files([ref]) if Path(ref).exists() else ref

    model_fp = {"old": ref_fp(old), "new": ref_fp(new)}

    # Bad input of any kind fails here, before anything trains.
    inputs = run("extract", check_inputs, old, new, data["pairs"], data["eval"], fingerprint=digest(data_fp, model_fp))
    root, prev = inputs["root"], inputs["prev"]
    corpus = run("extract", extract_corpus, data["corpus"], str(work / "corpus.parquet"), params.text_column,
                 params.min_chars, params.max_chars, params.sample, params.seed, fingerprint=data_fp["corpus"],
                 produces=lambda r: r["path"])

    # Only what the method reads is embedded (tasks.embed.embeddings_needed): XBT's φ pretraining rows
    # (corpus texts by default, the pairs' images with pretrain.source=image), Eqn. 6's old-model
    # targets of the pairs, a training-free map's corpus texts.
    pre_cfg = apply_overrides(PretrainConfig(), params.pretrain)
    needs = embeddings_needed(params.method, pre_cfg)
    with_pairs = any(n.endswith("_pairs") for n in needs)
    # "old" in Eqns. 3 and 6 is the old model; in a chain link the gallery's root model, or with
    # pretrain.chain_targets=champion the champion's compatible space (its bundle; PretrainConfig.chain_targets).
    targets = root if prev is not None and pre_cfg.chain_targets == "root" else old
    embeddings = run("embed", embed_corpus, corpus["path"], targets, new, cache_root, needs,
                     data["pairs"] if with_pairs else None,
                     fingerprint=digest(corpus, data_fp["pairs"] if with_pairs else "", model_fp,
                                        ref_fp(targets)),
                     progress=params.progress)

    phi_path = None
    if params.method == "xbt":  # only XBT starts from a pretrained φ (Sec. 3.2; text by default, PretrainConfig.source)
        phi_path = run("pretrain", pretrain, embeddings, cache_root, str(work / "phi.safetensors"), params.pretrain,
                       params.seed, data["pairs"] if pre_cfg.pair_weight else None, targets != root, produces=lambda r: r)

    bundle = run("train", train, new, old, root, inputs["chain"] if prev else [root], data["pairs"], params.method,
                 phi_path, embeddings, cache_root, str(out / "bundle"), str(work), params.finetune, params.seed,
                 fingerprint=digest(data_fp["pairs"], model_fp, fingerprint_content(phi_path) if phi_path else ""),
                 progress=params.progress, produces=lambda r: r)

    sample_path = str(work / "eval_sample.safetensors")  # the HTML report's map and examples
    recall_path = run("evaluate", evaluate, data["eval"], root, new, bundle, prev, cache_root, str(work / "recall.json"),
                      fingerprint=digest(data_fp["eval"], model_fp, fingerprint_content(bundle)),
                      sample_path=sample_path, produces=lambda r: r)
    verdict = run(None, gate, recall_path, params.gate_ks, prev is not None)
    recall = json.loads(Path(recall_path).read_text())

    report = {
        "method": params.method, "old": params.old, "new": params.new, "recall": recall, "gate": verdict["eqn2"],
        "counts": {"corpus": corpus["rows"], "pairs": inputs["pairs"], "eval_images": inputs["eval_images"],
                   "eval_captions": inputs["eval_captions"]},
        "timings_s": dict(run.timings),
        "config": {"seed": params.seed, "pretrain": params.pretrain, "finetune": params.finetune,
                   "text_column": params.text_column, "data": data},
        "bundle": bundle,
    }
    if prev:
        report["no_regression"] = verdict["no_regression"]
    # how much the verdict means: each Eqn. 2 margin with a bootstrap interval (xbtcore.margins)
    report["gate_margins"] = json.loads(margins_path(recall_path).read_text())
    histories = _histories(work)
    figures = run(None, draw_figures, histories, recall_path, str(work / "figures"))
    run(None, write_report, report, str(work / "report.json"))
    # MLflow's copy of report.html (before promotion); OUT/report.html below adds the promotion.
    run(None, write_html_report, str(work / "report.json"), data["eval"], sample_path, str(work / "report.html"))
    space = space_of(root)
    reg = run(None, register_and_promote, str(work / "report.json"), bundle, root, verdict, histories, figures)

    failures = [f for k, v in verdict.items() if k != "passed" for f in v["failures"]]
    report["promotion"] = {
        "promoted": reg["promoted"], "model": reg["name"], "version": reg["version"], "champion": reg["champion"],
        "reason": "gate passed: champion moved to this version" if reg["promoted"]
        else f"gate failed ({len(failures)} failing checks): not promoted, champion stays "
        + (f"version {reg['champion']}" if reg["champion"] is not None else "unset (no version has passed yet)"),
    }
    report["mlflow"] = {"experiment": reg["experiment"], "run_id": reg["run_id"], "uri": reg["uri"]}
    report["space"] = space
    report["steps"] = dict(run.states)
    report["next_steps"] = next_steps(report, pre_cfg)
    report_path = run(None, write_report, report, str(out / "report.json"))
    html_path = run(None, write_html_report, report_path, data["eval"], sample_path, str(out / "report.html"))
    run(None, publish_artifacts, report, verdict, html_path)
    run(None, record_datasets, [{"path": os.path.abspath(data[k]), "kind": k, "fingerprint": data_fp[k], "rows": n}
                                for k, n in (("corpus", corpus["rows"]), ("pairs", inputs["pairs"]), ("eval", inputs["eval_captions"]))])
    run_id = str(runtime.flow_run.id or digest(report_path, time.time()))
    run(None, record_run, {"run_id": run_id, "method": params.method, "old": old, "new": new, "root_model": root,
                           "space": space, "out_dir": str(out), "bundle": bundle, "gate_passed": verdict["passed"], "promoted": reg["promoted"], "mlflow_model": reg["name"],
                           "mlflow_version": reg["version"], "report": report_path},
        space, root, inputs["old_dim"])
    return report
