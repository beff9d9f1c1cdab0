"""The `xbt-upgrade` flow: old model + new model + data -> a gated, registered compatible query encoder.

    check inputs -> extract corpus -> embed (frozen, cached) -> fit the method's head (XBT: Eqn. 3)
    -> train (XBT: Eqn. 5, or a baseline) -> evaluate (CONTRACT.md cases) -> Eqn. 2 gate
    -> MLflow register (+ promote) -> catalog -> report (JSON, HTML)

Every step is a task in tasks/, called here in order; the method is read from
the registry (xbtcore.methods). A finished step is cached on its inputs, which
carry the fingerprints of the files they read, and writes to a path named by
them (`step_path`), so re-running the same upgrade skips it and a run with
other settings in the same folder never serves another's output.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from prefect import flow, runtime
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks.advice import next_steps
from tasks.common import (
    absolute_ref,
    cache_dir,
    digest,
    fingerprint_content,
    fingerprint_files,
    log,
    read_json,
    state_dir,
    step_path,
    step_states,
)
from tasks.embed import embed_frozen
from tasks.evaluate import OLD_IMAGES, TIED_IMAGES, check_inputs, evaluate, gate
from tasks.extract import check_corpus, ensure_world, extract_corpus
from tasks.registry import (
    attach_report,
    check_artifact_store,
    pinned_ref,
    register_and_promote,
    resolve_model,
    space_of,
)
from tasks.report import (
    build_report,
    draw_figures,
    finish_run,
    publish_artifacts,
    read_histories,
    record_datasets,
    record_run,
    write_report,
)
from tasks.servers import check_servers
from tasks.shards import check_scheduler, embed_corpus_on_dask, parse_dask
from tasks.train import fit_head, publish_bundle, train
from worlds import shapes
from xbtcore.backfill import BACKFILL_ORDER
from xbtcore.bundle import GAIN_FILE, blend_weights, is_bundle
from xbtcore.config import Settings, apply_overrides
from xbtcore.data import Gallery, ValSplit, check_output, parquet_files, read_pairs
from xbtcore.ddp import NPROC_HELP, resolve_nproc
from xbtcore.encoders import (
    COMPILE_HELP,
    DEVICE_HELP,
    PRECISION_HELP,
    check_hub_ref,
    check_model_dir,
    resolve_compile,
    resolve_device,
    resolve_precision,
)
from xbtcore.finetune import FinetuneConfig
from xbtcore.gate import CRITERION_NAMES, GATE_KS
from xbtcore.lock import busy, exclusive
from xbtcore.methods import by_cost, get_method, head_owner
from xbtcore.methods.select import choose, qualifies
from xbtcore.pretrain import PretrainConfig

STEPS = ("extract", "embed", "pretrain", "train", "validate", "evaluate")  # report.json's timings_s

# The demo's built-in world: half the benchmark world's corpus (115k rows, ~104k distinct).
# φ takes the same number of steps either way (PretrainConfig.min_steps), and embedding
# half the corpus saves a minute (docs/method.md).
DEMO_WORLD = {"corpus_captions": 115_000}


class UpgradeParams(BaseModel):
    """Everything an upgrade depends on; checked before any step runs."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    old: str = Field(
        "zoo/old", description="the model the gallery was embedded with: HF id/dir, bundle, or models:/ URI"
    )
    new: str = Field("zoo/new", description="the new model: HF id or directory")
    corpus: str | None = Field(
        None, description="text corpus Parquet (file, folder or glob); none: the built-in world"
    )
    pairs: str | None = Field(None, description="image-text pairs Parquet")
    eval: str | None = Field(None, description="eval set Parquet")
    out: str = Field("out/upgrade", description="run folder: report.json, report.html, bundle/, work/")
    method: str = Field(
        "auto",
        description="a registered method (`xbt methods`), or auto: the cheapest candidate "
        "that passes on the validation pairs",
    )
    val_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        allow_inf_nan=False,
        description="share of the pairs' images held out for validation "
        "(at least 500 images, at most half); 0: no validation",
    )
    gallery: str | None = Field(
        None,
        description="the stored old gallery (`xbt embed` output, `id` = the pairs' "
        "image_id): old image embeddings read instead of computed",
    )
    eval_in_gallery: bool = Field(
        False,
        description="the eval set's image_id name --gallery items too: its old image embeddings are read from "
        "the gallery (the old image tower then embeds only images the gallery lacks)",
    )
    allow_old_encoder: bool = Field(False, description="auto may choose a method whose queries run the old encoder")
    dask: str | None = Field(
        None,
        description="embed the corpus across Dask workers: local:N (N processes here) or a scheduler address "
        "tcp://HOST:PORT whose workers see the state folder (tasks/shards.py)",
    )
    device: str = Field("auto", description=DEVICE_HELP)
    precision: str = Field("auto", description=PRECISION_HELP)
    compile: str | int | None = Field(
        "auto", description=COMPILE_HELP + "; settled to the items a model embeds before it compiles (None: never)"
    )
    nproc: int | str = Field("auto", description=NPROC_HELP)
    seed: int = Field(0, ge=0)
    text_column: str = Field("caption", min_length=1)
    min_chars: int | None = Field(None, ge=1, description="drop corpus texts shorter than this")
    max_chars: int | None = Field(None, ge=1, description="drop corpus texts longer than this")
    sample: int | None = Field(None, ge=2, description="keep at most this many corpus texts (seeded)")
    gate_ks: list[int] = Field(default_factory=lambda: [1, 5, 10], min_length=1)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig, description="φ's pretraining (Eqn. 3)")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="training on the pairs")
    world: dict[str, int | float] = Field(
        default_factory=lambda: dict(DEMO_WORLD), description="WorldSpec overrides for the built-in world"
    )
    progress: bool = True
    started_at: float | None = Field(
        None,
        description="when the command started (epoch seconds): the report's total "
        "time then covers start-up and the built-in world too",
    )

    @field_validator("pretrain", "finetune", mode="before")
    @classmethod
    def _settings(cls, v, info):
        """Overrides ({"epochs": 5}, {"lora.rank": 8}) on the defaults; unknown keys and bad values fail here."""
        if isinstance(v, dict):
            return apply_overrides({"pretrain": PretrainConfig, "finetune": FinetuneConfig}[info.field_name](), v)
        return v

    @field_validator("method")
    @classmethod
    def _method(cls, v):
        if v != "auto":
            get_method(v)  # an unknown name fails here, naming the registered ones
        return v

    @field_validator("corpus", "pairs", "eval", "gallery")
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
            raise ValueError(
                f"model directory '{v}' does not exist: pass a Hugging Face directory, a hub id, "
                "a bundle (DIR/bundle) or models:/NAME@champion"
            )
        return v

    @field_validator("dask")
    @classmethod
    def _dask_reachable_form(cls, v):
        if v is not None:
            import importlib.util

            parse_dask(v)
            if importlib.util.find_spec("prefect_dask") is None:
                raise ValueError("--dask needs prefect-dask: pip install -e '.[dask]'")
        return v

    @field_validator("gate_ks")
    @classmethod
    def _ks(cls, v):
        # the validation margins auto chooses by are measured at GATE_KS: a gate at another K would be
        # checked only on the eval set, after every candidate had trained
        if not set(v) <= set(GATE_KS):
            raise ValueError(f"gate K values must be drawn from {list(GATE_KS)}, got {v}")
        return sorted(set(v))

    @model_validator(mode="after")
    def _consistent(self):
        given = [self.corpus is not None, self.pairs is not None, self.eval is not None]
        if any(given) and not all(given):
            raise ValueError("pass all of corpus, pairs and eval, or none of them (the built-in world)")
        if self.min_chars and self.max_chars and self.min_chars > self.max_chars:
            raise ValueError(f"min_chars {self.min_chars} > max_chars {self.max_chars}")
        world_fields = {f.name for f in dataclasses.fields(shapes.WorldSpec)}
        if set(self.world) - world_fields:
            raise ValueError(
                f"unknown world settings {sorted(set(self.world) - world_fields)}; known: {sorted(world_fields)}"
            )
        shapes.WorldSpec(**self.world)  # a fractional row count fails here, not in the world writer
        if self.eval_in_gallery and self.gallery is None:
            raise ValueError("--eval-in-gallery reads the eval images' old embeddings from --gallery: pass --gallery")
        if self.method == "auto" and not self.val_fraction:
            raise ValueError("--method auto chooses on the validation pairs: give --val-fraction above 0")
        self.device = resolve_device(self.device)  # "auto" settles here, on the machine that runs the flow
        self.precision = resolve_precision(self.precision, self.device)
        self.compile = resolve_compile(self.compile, self.device)
        self.nproc = resolve_nproc(self.nproc, self.device)
        self._preflight()
        return self

    def _preflight(self) -> None:
        """Every input a user gives, read and checked in seconds before any server starts or model loads:
        the corpus's text column and what its filters leave, every pair and eval row (images verified),
        the gallery's columns, ids and whether it holds any pair image_id (and, with --eval-in-gallery, any eval
        image_id), the local model folders' files and,
        offline, whether a hub id is in the local cache."""
        pairs = evalset = None
        if self.corpus is not None:
            check_corpus(self.corpus, self.text_column, self.min_chars, self.max_chars)
            pairs = read_pairs(self.pairs)
            evalset = read_pairs(self.eval)
        if self.gallery is not None:
            stored = Gallery(self.gallery)
            if pairs is not None:
                ids = stored.check_holds(pairs.image_ids, self.pairs)
                if self.eval_in_gallery:
                    stored.check_holds(evalset.image_ids, self.eval, "--eval", ids)
        for ref in (self.old, self.new):
            if Path(ref).expanduser().is_dir():
                if not is_bundle(ref):
                    check_model_dir(Path(ref).expanduser())
            elif not ref.startswith("models:/"):
                check_hub_ref(ref)  # what _model_ref leaves that is not a folder: a hub id

    @property
    def settings(self) -> Settings:
        return Settings(pretrain=self.pretrain, finetune=self.finetune)

    @property
    def runtime(self) -> tuple[str, str]:
        """(device type, precision): what the numbers of a trained or evaluated step depend on beyond its
        inputs, so part of those steps' paths."""
        return torch.device(self.device).type, self.precision


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


@dataclass
class Context:
    """What every candidate of one upgrade shares: its inputs, resolved once."""

    params: UpgradeParams
    settings: Settings
    work: Path
    cache_root: str
    clock: StepClock
    data: dict
    data_fp: dict
    model_fp: dict
    corpus: dict
    inputs: dict
    lineage: dict
    targets: str
    split: ValSplit | None


def train_candidate(ctx: Context, method: str) -> dict:
    """One method through the tasks: embed what it reads, fit its head, train, validate on the held-out pairs.
    -> {"method", "bundle", "validation" (its evaluate folder, or None), "needs", "seconds"}."""
    t0 = time.perf_counter()
    p, spec = ctx.params, get_method(method)
    # the fit term settled once, for what to embed and for the head's fit: against a champion's compatible space
    # (a chain link) it reads the corpus
    compatible_targets = ctx.targets != ctx.inputs["root"]
    settled = dataclasses.replace(ctx.settings, pretrain=ctx.settings.pretrain.for_targets(compatible_targets))
    needs = list(spec.needs(spec.config(settled)))
    pairs_fp = ctx.data_fp["pairs"] if any(n not in ("w_new", "w_old") for n in needs) else ""
    with ctx.clock("embed"):
        if p.dask and {"w_new", "w_old"} & set(needs):
            refs = {"w_new": ctx.lineage["new"], "w_old": ctx.targets}
            embed_corpus_on_dask(
                p.dask,
                ctx.cache_root,
                [refs[n] for n in ("w_new", "w_old") if n in needs],
                ctx.corpus["path"],
                precision=p.precision,
                compile_after=p.compile,
            )
        embeddings = embed_frozen(
            needs,
            ctx.corpus["path"],
            ctx.data["pairs"],
            ctx.targets,
            ctx.lineage["new"],
            ctx.cache_root,
            ctx.split,
            p.gallery,
            fingerprint=digest(
                ctx.corpus["fingerprint"], pairs_fp, ctx.model_fp, model_fingerprint(ctx.targets), p.gallery
            ),
            progress=p.progress,
            device=p.device,
            precision=p.precision,
            compile_after=p.compile,
        )
    head = None
    if spec.fit_head is not None:
        with ctx.clock("pretrain"):
            owner = head_owner(method)  # a head two methods share is fitted once
            own = get_method(owner)
            # only what the owner reads: the shared head's step and cache key are the owner's own
            head_reads = {n: embeddings[n] for n in own.needs(own.config(settled))}
            head = fit_head(
                owner,
                settled,
                head_reads,
                ctx.cache_root,
                ctx.data["pairs"],
                ctx.split,
                p.seed,
                step_path(
                    ctx.work,
                    f"head-{owner}",
                    settled,
                    head_reads,
                    ctx.data_fp["pairs"],
                    ctx.split,
                    p.seed,
                    compatible_targets,
                    p.runtime,
                    suffix=".safetensors",
                ),
                device=p.device,
            )
    with ctx.clock("train"):
        bundle = train(
            method,
            ctx.settings,
            head,
            embeddings,
            ctx.cache_root,
            ctx.data["pairs"],
            ctx.split,
            ctx.lineage,
            p.seed,
            step_path(
                ctx.work,
                f"bundle-{method}",
                ctx.settings,
                embeddings,
                ctx.data_fp["pairs"],
                ctx.split,
                ctx.model_fp,
                fingerprint_content(head) if head else "",
                ctx.lineage,
                p.seed,
                p.runtime,
                p.nproc,
            ),
            progress=p.progress,
            device=p.device,
            precision=p.precision,
            nproc=p.nproc,
        )
    validation = None
    if ctx.split is not None:
        with ctx.clock("validate"):
            validation = evaluate(
                ctx.data["pairs"],
                ctx.inputs["root"],
                ctx.lineage["new"],
                bundle,
                ctx.inputs["prev"],
                ctx.cache_root,
                step_path(
                    ctx.work,
                    f"validate-{method}",
                    ctx.data_fp["pairs"],
                    ctx.split,
                    ctx.model_fp,
                    fingerprint_content(bundle),
                    p.gallery,
                    p.runtime,
                ),
                part="val",
                split=ctx.split,
                gallery=p.gallery,
                device=p.device,
                precision=p.precision,
            )
    return {
        "method": method,
        "bundle": bundle,
        "head": head,
        "validation": validation,
        "needs": needs,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def candidate_record(method: str, eligible: bool, run: dict | None, why_not_run: str = "") -> dict:
    """report.json's entry for a candidate: its validation recall and margins, wall time and what it ran."""
    spec = get_method(method)
    record = {
        "method": method,
        "cost": spec.cost,
        "eligible": eligible,
        "old_encoder_at_query": spec.old_encoder_at_query,
        "trains": spec.trains,
    }
    if run is None:
        return {**record, "ran": False, "why": why_not_run, "margins": None}
    folder = Path(run["validation"]) if run["validation"] else None
    margins = read_json(folder / "gate_margins.json") if folder else None
    alpha = blend_weights(run["bundle"])
    return {
        **record,
        "ran": True,
        "seconds": run["seconds"],
        "embedded": run["needs"],
        **({"alpha": alpha} if alpha is not None else {}),
        "recall": read_json(folder / "recall.json") if folder else None,
        "margins": margins,
    }


OUT_BUSY_FIX = "wait for that run to finish, or pass another --out"  # another upgrade writes OUT
REPORT_FILES = ("report.json", "report.html")  # a run folder with report.json is a finished run


def drop_unreported_bundle(flow, flow_run, state) -> None:
    """On a failed, crashed or cancelled upgrade: OUT/bundle without a report (moved there by this run, whose
    report was not written) is removed, so that nothing unevaluated is left looking finished. The trained bundle
    stays cached under OUT/work: a rerun does not train again."""
    params = flow_run.parameters.get("params")
    out = params.get("out") if isinstance(params, dict) else getattr(params, "out", None)
    if out is None:
        return
    out = Path(out).expanduser().absolute()
    if busy(out):  # refused because another run writes there: what is there is that run's
        return
    if not (out / "report.json").is_file():
        for unfinished in (out / "bundle", out / "bundle.tmp"):
            shutil.rmtree(unfinished, ignore_errors=True)


@flow(
    name="xbt-upgrade",
    log_prints=True,
    on_failure=[drop_unreported_bundle],
    on_crashed=[drop_unreported_bundle],
    on_cancellation=[drop_unreported_bundle],
)
def upgrade(params: UpgradeParams) -> dict:
    """One upgrade; writes OUT/report.json, OUT/report.html and OUT/bundle/, registers the bundle in MLflow.
    One run at a time writes OUT: a second one is refused before any work."""
    out = Path(params.out).expanduser().absolute()
    with exclusive(out, "xbt upgrade", OUT_BUSY_FIX):
        return _upgrade(params, out)


def check_not_replaced(out: Path, models: dict[str, str]) -> None:
    """A model inside OUT/bundle or OUT/work would be replaced by this run: a chain link written into its
    --old bundle's folder destroys that link, and its bundle then names itself as its old model."""
    for flag, ref in models.items():
        if not Path(ref).is_dir():
            continue
        for replaced in (out / "bundle", out / "work"):
            if Path(ref).resolve().is_relative_to(replaced.resolve()):
                raise ValueError(
                    f"{flag} {ref} is inside {replaced}, which this run replaces: pass another --out "
                    "(each link of a chain needs a run folder of its own)"
                )


def _upgrade(params: UpgradeParams, out: Path) -> dict:
    t_start = time.perf_counter()
    check_servers()
    if params.dask and "address" in parse_dask(params.dask):
        check_scheduler(params.dask)
    work = out / "work"
    clock = StepClock()
    settings = params.settings
    split = ValSplit(params.val_fraction, seed=params.seed) if params.val_fraction else None

    if params.corpus is None:
        world = dataclasses.asdict(shapes.WorldSpec(**params.world))
        data = ensure_world(world, str(state_dir() / f"world-{digest(world)}"))
    else:
        data = {"corpus": params.corpus, "pairs": params.pairs, "eval": params.eval}
    data_fp = {k: fingerprint_files(parquet_files(v)) for k, v in data.items()}
    old = absolute_ref(resolve_model(params.old))
    new = absolute_ref(resolve_model(params.new))
    check_not_replaced(out, {"--old": old, "--new": new})
    model_fp = {"old": model_fingerprint(old), "new": model_fingerprint(new)}

    with clock("extract"):  # bad input of any kind fails here, before anything trains
        inputs = check_inputs(
            old,
            new,
            data["pairs"],
            data["eval"],
            split,
            params.gallery,
            fingerprint=digest(data_fp, model_fp, params.gallery and fingerprint_files([params.gallery])),
            eval_in_gallery=params.eval_in_gallery,
        )
        check_artifact_store(inputs["root"])  # registration's store, before anything trains
        corpus_filter = (params.text_column, params.min_chars, params.max_chars, params.sample, params.seed)
        corpus = extract_corpus(
            data["corpus"],
            step_path(work, "corpus", data_fp["corpus"], corpus_filter, suffix=".parquet"),
            *corpus_filter,
            fingerprint=data_fp["corpus"],
        )
    if corpus["rows"] < inputs["new_dim"]:
        log().warning(
            "the corpus holds %d distinct texts, fewer than the new model's %d embedding dimensions: the maps "
            "fitted on it (procrustes, φ's pretraining) are underdetermined; pass a corpus of many more texts",
            corpus["rows"],
            inputs["new_dim"],
        )
    root, prev = inputs["root"], inputs["prev"]
    # "old" in Eqns. 3 and 6 is the old model; in a chain link the gallery's root model, or with
    # pretrain.chain_targets=champion the champion's compatible space (its bundle).
    targets = root if prev is not None and settings.pretrain.chain_targets == "root" else old
    ctx = Context(
        params,
        settings,
        work,
        str(cache_dir()),
        clock,
        data,
        data_fp,
        model_fp,
        corpus,
        inputs,
        {"new": new, "old": old, "root": root, "chain": inputs["chain"] if prev else [root]},
        targets,
        split,
    )

    candidates, runs = [], {}
    for method in portfolio(params.method, params.allow_old_encoder):
        eligible = params.method != "auto" or params.allow_old_encoder or not get_method(method).old_encoder_at_query
        done = params.method == "auto" and any(
            c["eligible"] and qualifies(c, params.gate_ks) for c in candidates if c["ran"]
        )
        if done and eligible:
            candidates.append(candidate_record(method, eligible, None, "a cheaper candidate passed on validation"))
            continue
        runs[method] = train_candidate(ctx, method)
        candidates.append(candidate_record(method, eligible, runs[method]))
    chosen = (
        choose(candidates, params.gate_ks)
        if params.method == "auto"
        else {"method": params.method, "reason": "--method"}
    )
    run_of = runs[chosen["method"]]
    spec = get_method(chosen["method"])
    if params.method != "auto" and (Path(run_of["bundle"]) / "old").is_dir():  # auto: only --allow-old-encoder
        chosen["reason"] += "; its queries also run the old encoder, which a deployment must keep serving"
        log().warning("%s: queries also run the old encoder (the bundle carries it)", spec.name)
    fitted = Path(run_of["validation"]) / "backfill_gain.json" if run_of["validation"] else None  # on val pairs
    extra = {GAIN_FILE: str(fitted)} if fitted and fitted.is_file() else {}
    # Evaluated and registered from work/, moved into OUT beside its report only once that is written: a run
    # killed before then leaves OUT as the previous run left it (its bundle with its report, or nothing).
    bundle = publish_bundle(run_of["bundle"], str(work / "bundle"), extra)
    order = "learned" if extra else BACKFILL_ORDER  # the order `xbt backfill` takes from this bundle

    # The eval set's old side is embedded by the old model unless --eval-in-gallery says its image ids are the
    # gallery's too: an eval set and the pairs often both number their images from 0, the gallery's are the pairs'.
    eval_gallery = params.gallery if params.eval_in_gallery else None
    eval_inputs = (data_fp["eval"], model_fp, fingerprint_content(bundle), prev, order, eval_gallery, params.runtime)
    with clock("evaluate"):
        evaluated = evaluate(
            data["eval"],
            root,
            new,
            bundle,
            prev,
            ctx.cache_root,
            step_path(work, "evaluate", *eval_inputs),
            gallery=eval_gallery,
            backfill_order=order,
            device=params.device,
            precision=params.precision,
        )
    recall = read_json(Path(evaluated) / "recall.json")
    verdict = gate(recall, params.gate_ks, prev is not None)

    run = {
        "method": chosen["method"],
        "old": params.old,
        "new": params.new,
        # what each REF named for this run: an alias URI (models:/NAME@champion) moves on, its version does not
        "resolved": {"old": pinned_ref(params.old, old), "new": pinned_ref(params.new, new)},
        "counts": {
            "corpus": corpus["rows"],
            "pairs": inputs["pairs"],
            "eval_images": inputs["eval_images"],
            "eval_captions": inputs["eval_captions"],
            "eval_images_in_pairs": inputs["images"]["eval"]["in_pairs"],
            "val_images": inputs["val_images"],
            "val_pairs": inputs["val_pairs"],
        },
        "eval_images_tied": read_json(tied) if (tied := Path(evaluated) / TIED_IMAGES).is_file() else None,
        "timings_s": dict(clock.seconds),
        "bundle": str(out / "bundle"),
        "space": space_of(root),
        "config": {
            "seed": params.seed,
            "val_fraction": params.val_fraction,
            "device": params.device,
            "precision": params.precision,
            "compile": params.compile,
            "nproc": params.nproc,
            **dataclasses.asdict(spec.config(settings)),
            "text_column": params.text_column,
            "data": data,
        },
    }
    histories = read_histories({"pretrain": run_of["head"], "train": run_of["bundle"]})
    figures = draw_figures(histories, recall, str(work / "figures"))
    reg = register_and_promote(run, recall, bundle, root, verdict, histories, figures)
    failing = ", ".join(
        f"{len(v['failures'])} failing {CRITERION_NAMES[v['criterion']]} check{'s' * (len(v['failures']) != 1)}"
        for k, v in verdict.items()
        if k != "passed" and v["failures"]
    )
    promotion = {
        "promoted": reg["promoted"],
        "model": reg["name"],
        "version": reg["version"],
        "champion": reg["champion"],
        "reason": "gate passed: champion moved to this version"
        if reg["promoted"]
        else f"gate failed ({failing}): not promoted, champion stays "
        + (f"version {reg['champion']}" if reg["champion"] is not None else "unset (no version has passed yet)"),
    }
    run["mlflow"] = {
        "experiment": reg["experiment"],
        "run_id": reg["run_id"],
        "uri": reg["uri"],
        "tracking_uri": reg["tracking_uri"],
    }
    run["steps"] = step_states(runtime.flow_run.id)
    total = time.time() - params.started_at if params.started_at else time.perf_counter() - t_start
    run["timings_s"] = {**clock.seconds, "total": round(total, 2)}
    # the eval set's count as the evaluation made it (the other parts' as the input check found them)
    images = {**inputs["images"], "eval": read_json(Path(evaluated) / OLD_IMAGES)}
    run["old_image_tower"] = old_images_embedded(images, [r["needs"] for r in runs.values()])
    margins = read_json(Path(evaluated) / "gate_margins.json")
    advice = next_steps(
        {
            "method": chosen["method"],
            "gate": verdict["eqn2"],
            "gate_margins": margins,
            "recall": recall,
            "no_regression": verdict.get("no_regression"),
            "candidates": candidates,
            "counts": run["counts"],
            "eval_images_tied": run["eval_images_tied"],
        },
        settings.pretrain,
    )
    backfill_file = Path(evaluated) / "backfill.json"
    backfill = read_json(backfill_file) if backfill_file.is_file() else None
    if backfill is not None and "curves" not in backfill:  # an evaluation cached by an older xbt: leave it out
        backfill = None
    report = build_report(run, recall, verdict, margins, promotion, advice, candidates, chosen, backfill)
    # the catalog first: a run that cannot record itself fails before its report marks OUT finished
    record_datasets(
        [
            {"path": os.path.abspath(data[k]), "kind": k, "fingerprint": data_fp[k], "rows": n}
            for k, n in (("corpus", corpus["rows"]), ("pairs", inputs["pairs"]), ("eval", inputs["eval_captions"]))
        ]
    )
    run_id = str(runtime.flow_run.id or digest(str(out / "report.json"), time.time()))
    record_run(
        {
            "run_id": run_id,
            "method": chosen["method"],
            "old": old,
            "new": new,
            "root_model": root,
            "space": run["space"],
            "out_dir": str(out),
            "bundle": run["bundle"],
            "gate_passed": verdict["passed"],
            "promoted": reg["promoted"],
            "mlflow_model": reg["name"],
            "mlflow_version": reg["version"],
            "registry": reg["tracking_uri"],
            "report": str(out / "report.json"),
            "finished": False,
        },
        run["space"],
        root,
        inputs["old_dim"],
    )
    for stale in REPORT_FILES:  # the previous run's report describes the bundle this run replaces
        (out / stale).unlink(missing_ok=True)
    publish_bundle(bundle, str(out / "bundle"))
    written = write_report(report, data["eval"], str(Path(evaluated) / "sample.safetensors"), str(out))
    if reg["run_open"]:
        attach_report(reg["run_id"], [written["json"], written["html"]])
    publish_artifacts(report, verdict, written["html"])
    finish_run(run_id)
    return report


def portfolio(method: str, allow_old_encoder: bool) -> list[str]:
    """The methods an upgrade runs: the one named, or for "auto" the registry's candidates, cheapest first
    (one needing the old encoder at query time runs too, for the report, but is eligible only when allowed)."""
    if method != "auto":
        return [method]
    return [m.name for m in by_cost() if m.portfolio]


def old_images_embedded(images: dict, needs: list[list[str]]) -> dict:
    """How many distinct images the old image tower embedded: those of the eval set (all of them, unless
    --eval-in-gallery), of the validation pairs (always) and of the training pairs (when a candidate read
    their old embeddings) that the stored gallery does not hold."""
    parts = ["eval", "val"] + (["train"] if any("v_old_pairs" in n for n in needs) else [])
    counts = {part: images[part]["images"] - images[part]["in_gallery"] for part in parts if part in images}
    return {
        "images": sum(counts.values()),
        "by_part": counts,
        "from_gallery": sum(images[p]["in_gallery"] for p in parts if p in images),
    }
