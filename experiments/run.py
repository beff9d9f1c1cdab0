"""Studies that are not a paper table: each a JSON config of runs, its results named from it.

    python experiments/run.py experiments/configs/pair_weight.json [more configs]
    python experiments/run.py --check experiments/configs/*.json     # parse every run's flags, run nothing

A config, experiments/configs/NAME.json:

    {"about": "what the study asks",
     "script": "bench/quality.py",                        a bench script, or a probe under experiments/
     "args": ["--methods", "xbt", "--seeds", "0", "1"],   its flags for every run
     "grid": {"pretrain.pair_weight": [0, 1, 2], "--new": ["zoo/new", "zoo/mid"]},
     "variants": {"NAME": ["--set", "pretrain.sigma=0"]}}

`grid` makes one run per combination (a SCOPE.FIELD key is a `--set`, a key
starting with -- a flag); `variants` adds named runs; neither: one run. Every run
is the script's `run(args)` on its parser's flags: the benches upgrade through
the product's flow, all in this process under one private Prefect API, with
the benches' state folder. experiments/results/NAME.json records the command,
the git commit, the date, the machine and each run's flags and result.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import itertools
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, emit, git_commit, machine, progress, use_bench_state  # noqa: E402

RESULTS = ROOT / "experiments" / "results"


def read_config(path: Path) -> dict:
    config = json.loads(Path(path).read_text())
    unknown = set(config) - {"about", "script", "args", "grid", "variants"}
    if unknown or "script" not in config:
        raise ValueError(
            f"{path}: a config has a script and some of about, args, grid, variants; got {sorted(config)}"
        )
    return config


def grid_flags(key: str, value) -> list[str]:
    value = value if isinstance(value, str) else json.dumps(value)
    return [key, value] if key.startswith("--") else ["--set", f"{key}={value}"]


def runs_of(config: dict) -> dict[str, list[str]]:
    """{run name: the script's flags}: the grid's combinations, then the named variants."""
    runs = {}
    grid = config.get("grid", {})
    for combo in itertools.product(*grid.values()) if grid else []:
        name = ",".join(f"{k.removeprefix('--')}={v}" for k, v in zip(grid, combo))
        runs[name] = [*config.get("args", []), *(x for k, v in zip(grid, combo) for x in grid_flags(k, v))]
    for name, flags in config.get("variants", {}).items():
        runs[name] = [*config.get("args", []), *flags]
    return runs or {"default": list(config.get("args", []))}


def script_module(script: str):
    """The module of a script path (bench/quality.py -> bench.quality): it has parser() and run(args)."""
    return importlib.import_module(".".join(Path(script).with_suffix("").parts))


def parsed_runs(path: Path) -> dict[str, argparse.Namespace]:
    """Each run's flags parsed by its script's parser; a bad flag or setting is a ValueError naming the run."""
    from xbtcore.config import Settings, parse_settings

    config = read_config(path)
    parser = script_module(config["script"]).parser()
    parser.exit_on_error = False
    out = {}
    for name, flags in runs_of(config).items():
        try:
            out[name], extra = parser.parse_known_args(flags)
            if extra:
                raise ValueError(f"unknown flags {extra}")
            Settings.of(parse_settings(getattr(out[name], "set", [])))
        except (argparse.ArgumentError, ValueError) as e:
            raise ValueError(f"{path}: run {name!r} ({shlex.join(flags)}): {e}") from e
    return out


def run_config(path: Path, results: Path = RESULTS) -> dict:
    """Every run of one config, in order, into results/NAME.json (rewritten after each run)."""
    config, runs = read_config(path), parsed_runs(path)
    module = script_module(config["script"])
    out = results / f"{Path(path).stem}.json"
    record = {
        "config": Path(path).stem,
        "about": config.get("about", ""),
        "script": config["script"],
        "command": shlex.join(["python", "experiments/run.py", _shown(path)]),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "runs": [],
    }
    for name, args in runs.items():
        progress(f"== {record['config']}: {name}")
        record["runs"].append({"name": name, "flags": runs_of(config)[name], "result": module.run(args)})
        results.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n")
    return record


def _shown(path: Path) -> str:
    path = Path(path).absolute()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("configs", nargs="+", type=Path)
    ap.add_argument("--check", action="store_true", help="parse every run's flags and settings, run nothing")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    try:
        counts = {path.stem: len(parsed_runs(path)) for path in args.configs}  # a bad config fails before any run
        if not args.check:
            use_bench_state()
            from tasks.servers import prefect_api

            with prefect_api():
                for path in args.configs:
                    run_config(path, args.results)
    except ValueError as e:
        raise SystemExit(f"experiments/run.py: {e}") from e
    emit({"runs": counts, "ran": not args.check})


if __name__ == "__main__":
    main()
