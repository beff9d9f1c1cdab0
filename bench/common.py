"""What the benchmark scripts share.

Throughput benches: which machine a figure came from, timing, peak RSS of a
side run in its own process, and the one-JSON-object output. Figures are
ratios of two sides measured in the same run; peak memory is per side, each
side in its own child process so the two never share a high-water mark.

Paper-table benches (quality, chain, ablations, zeroshot, cost): a world
folder, the shared flags, and one upgrade through the product's flow
(`flows.upgrade.upgrade`), whose report is what a table reads. `table_main`
points Prefect, MLflow and xbt state at the bench's own folder and opens one
private Prefect API for the whole process; a script's `run(args)` only assumes
an API is configured, so tests call it under their own harness.
"""

from __future__ import annotations

import argparse
import dataclasses
import filecmp
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Synthetic corpora, worlds, scratch caches and the flow runs' state: under XBT_STATE_DIR (make sets .state/).
BENCH_STATE = Path(os.environ.get("XBT_STATE_DIR") or ROOT / ".state").absolute() / "bench"
DIRECTIONS = ("t2i", "i2t")
GATE_KS = ("1", "5", "10")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str = "cpu") -> str:
    """The machine a figure came from: the GPU's name on cuda, else the CPU and torch's thread count."""
    import torch

    if device.startswith("cuda"):
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {cpu_name()}, {torch.get_num_threads()} threads"


def check_device(device: str) -> str:
    """--device settled as the product settles it (`encoders.resolve_device`); a clear exit where it cannot be."""
    from xbtcore.encoders import resolve_device

    try:
        return resolve_device(device)
    except ValueError as e:
        raise SystemExit(f"--device: {e}") from None


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


class Clock:
    """Wall and CPU seconds (all threads of this process) of a block; cuda work is synchronised."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.wall = self.cpu = 0.0

    def __enter__(self):
        sync(self.device)
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.wall += time.perf_counter() - self._wall
        self.cpu += time.process_time() - self._cpu


def rss_mb() -> float:
    """This process's resident memory now, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def run_child(argv: list[str], env: dict | None = None) -> dict:
    """Run `python argv...` in a fresh process; -> its JSON (last stdout line) plus
    peak_rss_mb, the child's own high-water mark (wait4's rusage is per child)."""
    proc = subprocess.Popen(
        [sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE, env={**os.environ, **(env or {})}, text=True
    )
    out = proc.stdout.read()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"child {' '.join(argv)} failed with exit status {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)  # ru_maxrss is in KiB on Linux
    return result


def git_commit() -> str:
    """The checkout's short commit, +dirty when tracked files other than the results and the doc they
    render differ from it (a suite run rewrites those as it goes)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    try:
        changed = git(
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            ".",
            ":!bench/results",
            ":!experiments/results",
            ":!docs/benchmarks.md",
        )
        return (git("rev-parse", "--short", "HEAD") or "unknown") + ("+dirty" if changed else "")
    except OSError:
        return "unknown"


def emit(result: dict, json_out: str = "") -> dict:
    """The one JSON object a bench prints on stdout (progress goes to stderr); also saved to `json_out`."""
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)
    return result


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- paper-table benches: worlds, flags, the flow ------------------------------------------------


def world_overrides(items: list[str]) -> dict:
    """["seed=1", "user_phrasing=0.5"] -> WorldSpec overrides; a bad field or value is a ValueError naming it."""
    from worlds import shapes

    fields = sorted(f.name for f in dataclasses.fields(shapes.WorldSpec))
    out = {}
    for kv in items:
        key, sep, value = kv.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--world {kv!r}: use FIELD=VALUE with FIELD one of {', '.join(fields)}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"--world {kv!r}: the value must be a number") from None
    shapes.WorldSpec(**out)  # a value out of range fails here, naming the field
    return out


def world_paths(data: str | Path, overrides: dict | None = None) -> dict[str, str]:
    """corpus, pairs and eval Parquet of a world folder. A folder without them gets the built-in world
    (worlds.shapes.WorldSpec with `overrides`), its spec saved beside them as world.json."""
    from worlds import shapes

    data = Path(data)
    paths = {k: str(data / f"{k}.parquet") for k in ("corpus", "pairs", "eval")}
    spec_file = data / "world.json"
    if all(Path(p).exists() for p in paths.values()):
        if overrides and spec_file.exists() and world_spec(data) != shapes.WorldSpec(**overrides):
            raise ValueError(
                f"{data} holds another world ({spec_file}): give --data a new folder for --world {overrides}"
            )
        return paths
    spec = shapes.WorldSpec(**(overrides or {}))
    progress(f"writing the built-in world {spec} to {data}")
    data.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(json.dumps(dataclasses.asdict(spec), indent=2) + "\n")  # first: a finished world has it
    shapes.write_world(data, spec)
    return paths


def world_spec(data: str | Path):
    """The WorldSpec a world folder was written with (its world.json)."""
    from worlds import shapes

    spec_file = Path(data) / "world.json"
    if not spec_file.exists():
        raise ValueError(
            f"{data} has no world.json: pass a world folder the benches wrote (a --data that did not exist)"
        )
    return shapes.WorldSpec(**json.loads(spec_file.read_text()))


def add_world_flags(ap: argparse.ArgumentParser) -> None:
    """--old, --new and the world: --data, or the built-in world with --world overrides."""
    ap.add_argument("--old", default="zoo/old", help="the model the gallery was embedded with")
    ap.add_argument("--new", default="zoo/new")
    ap.add_argument(
        "--data",
        default="",
        help="world folder with corpus/pairs/eval.parquet (the built-in world "
        "is written there if missing); default: one under the bench's state "
        "named by --world",
    )
    ap.add_argument(
        "--world",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="WorldSpec field of the built-in world written into a missing --data, e.g. seed=1",
    )
    ap.add_argument(
        "--named",
        default="",
        metavar="WORLD",
        help="a world of worlds.WORLDS by name at its default spec (glyphs, textures, scenes; worlds.ROLES says "
        "which are report worlds), written under the bench's state when missing; instead of --data and --world",
    )


def world_dir(args) -> Path:
    """--data, a named world's folder under the bench's state, or the bench's folder of the built-in world with
    args' --world overrides."""
    if args.data:
        return Path(args.data)
    if getattr(args, "named", ""):
        return BENCH_STATE / f"world-{args.named}"
    overrides = world_overrides(args.world)
    return BENCH_STATE / "-".join(["world", *(f"{k}{v}" for k, v in sorted(overrides.items()))])


def world_of(args) -> dict[str, str]:
    """args' world: its corpus, pairs and eval Parquet, written first when missing."""
    if getattr(args, "named", ""):
        from worlds import WORLDS
        from worlds.base import write_world

        if args.data or args.world:
            raise ValueError("--named names the world: leave out --data and --world")
        if args.named not in WORLDS:
            raise ValueError(f"--named {args.named!r}: choose one of {', '.join(sorted(WORLDS))}")
        folder = world_dir(args)
        if not (folder / "world.json").exists():  # write_world writes world.json last
            progress(f"writing world {args.named} to {folder}")
            write_world(args.named, folder)
        return {k: str(folder / f"{k}.parquet") for k in ("corpus", "pairs", "eval")}
    return world_paths(world_dir(args), world_overrides(args.world))


def table_parser(doc: str, methods: bool = True, seeds: bool = True, out: bool = True) -> argparse.ArgumentParser:
    """The flags every paper-table bench shares; one that trains only XBT, or one seed, or keeps no run
    folders, leaves some out."""
    from xbtcore.methods import by_cost

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_world_flags(ap)
    if methods:
        names = [m.name for m in by_cost()]
        ap.add_argument(
            "--methods",
            nargs="+",
            default=names,
            choices=["auto", *names],
            help="registered methods, or auto (the flow's default: the portfolio, chosen on validation)",
        )
    if seeds:
        ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SCOPE.FIELD=VALUE",
        help="config override, as `xbt upgrade --set`: pretrain.sigma=0.05, finetune.batch_size=256",
    )
    if out:
        ap.add_argument(
            "--out",
            default=str(BENCH_STATE / "runs"),
            help="where each upgrade's run folder goes (named by its inputs: a rerun is served from the cache)",
        )
    ap.add_argument("--json-out", default="", help="also save the result JSON here")
    return ap


def data_of(args) -> dict:
    """What a table records about its world: the folder and, when the benches wrote it, its spec."""
    folder = world_dir(args)
    spec = folder / "world.json"
    return {"folder": str(folder), "world": json.loads(spec.read_text()) if spec.exists() else None}


def upgrade(args, method: str, seed: int, old: str | None = None, new: str | None = None, **params) -> dict:
    """One upgrade through the product's flow on args' world, models and `--set` settings -> its report.

    params: further UpgradeParams fields (pairs=..., sample=...). The run folder under --out is named
    by the parameters, so the same upgrade again (in any bench) finds its steps cached.
    """
    from flows.upgrade import UpgradeParams
    from flows.upgrade import upgrade as flow
    from tasks.common import digest
    from xbtcore.config import parse_settings

    data = world_of(args)
    fields = {
        "old": old or args.old,
        "new": new or args.new,
        **data,
        "method": method,
        "seed": seed,
        **parse_settings(args.set),
        **params,
    }
    out = Path(args.out) / f"{method}-seed{seed}-{digest(fields)}"
    return flow(UpgradeParams(**fields, out=str(out), progress=sys.stderr.isatty()))


def pair_images(pairs: str) -> int:
    """Distinct images of a pairs Parquet file."""
    import pyarrow.parquet as pq

    return len(set(pq.read_table(pairs, columns=["image_id"]).column(0).to_pylist()))


def trainable_params(report: dict) -> int:
    """Trainable parameters of the run's training step, from the history it wrote beside the bundle it
    published (tasks.train), found under the run's work/ by the bundle's head file."""
    bundle = Path(report["bundle"])
    for history in sorted((bundle.parent / "work").glob("bundle-*.history.json")):
        trained = history.with_name(history.name.removesuffix(".history.json"))
        if filecmp.cmp(trained / "phi.safetensors", bundle / "phi.safetensors", shallow=False):
            return json.loads(history.read_text())["trainable_params"]
    raise FileNotFoundError(f"no training history under {bundle.parent / 'work'} for {bundle}")


def run_row(report: dict) -> dict:
    """What a table keeps of one upgrade's report: the eval set's figures, which method ran (auto's choice
    among candidates too), the backfill curves of its eval gallery, and each candidate's validation margins,
    recall and blend weights."""
    keys = ("method", "recall", "gate", "no_regression", "gate_margins", "timings_s", "counts", "chosen", "backfill")
    validation = {
        c["method"]: {k: c.get(k) for k in ("ran", "eligible", "seconds", "alpha", "margins", "recall")}
        for c in report.get("candidates", [])
    }
    return {
        **{k: report[k] for k in keys if k in report},
        "validation": validation,
        "report": str(Path(report["bundle"]).parent / "report.json"),
        "model": f"models:/{report['promotion']['model']}/{report['promotion']['version']}",
    }


def mean_recall(rows: list[dict], case: str) -> dict:
    """{direction: {K: mean R@K over rows}} of one recall case, at the gate's K values."""
    return {
        d: {k: round(statistics.fmean(r["recall"][d][case][k] for r in rows), 2) for k in GATE_KS} for d in DIRECTIONS
    }


def table_main(parser, run) -> dict:
    """A paper-table script's main(): parse, state in the bench's folder, one private Prefect API, run, emit."""
    args = parser().parse_args()
    use_bench_state()
    from pydantic import ValidationError

    from tasks.servers import prefect_api
    from xbtcore.config import Settings, parse_settings

    try:
        Settings.of(parse_settings(args.set))  # a bad --set fails now, not after the first upgrade
        world_overrides(args.world)
        with prefect_api():
            return emit(run(args), args.json_out)
    except (ValueError, ValidationError) as e:
        raise SystemExit(f"{Path(sys.argv[0]).name}: {e}") from e


def use_bench_state(state: Path = BENCH_STATE) -> None:
    """Prefect, MLflow and xbt state of this process's flow runs in `state`; prefect reads its settings
    when first imported, so this runs before that."""
    assert "prefect" not in sys.modules, "set the state folder before prefect is imported"
    from flows.cli import _set_env_defaults

    (state / "mlflow").mkdir(parents=True, exist_ok=True)
    os.environ.update(
        {
            "XBT_STATE_DIR": str(state),
            "PREFECT_HOME": str(state / "prefect"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{state / 'mlflow' / 'mlflow.db'}",
        }
    )
    _set_env_defaults()  # the CLI's defaults for the rest (analytics off, startup timeout, log stream)
    os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_STREAM"] = "ext://sys.stderr"  # stdout holds the one JSON object
