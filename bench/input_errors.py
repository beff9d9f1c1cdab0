"""How fast a bad input fails: each bad input of CONTRACT.md through the `xbt` command, timed, as JSON.

    .venv/bin/python bench/input_errors.py            # goal: every case under 10 s, one line naming the input

Each case writes a small world (worlds.shapes), breaks one input, and runs `xbt` in a fresh process the way a
user does; the time is the process's whole wall time (imports included), the line is its stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine  # noqa: E402
from worlds import shapes  # noqa: E402

GOAL_S = 10.0


def _drop(src: str, column: str, dst: Path) -> str:
    pq.write_table(pq.read_table(src).drop_columns([column]), dst)
    return str(dst)


def _broken_image(src: str, dst: Path) -> str:
    t = pq.read_table(src)
    images = t.column("image").to_pylist()
    images[3] = b"\x89PNG not an image"
    pq.write_table(t.set_column(t.schema.get_field_index("image"), "image", pa.array(images, pa.binary())), dst)
    return str(dst)


def cases(world: dict, tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (xbt arguments, a word the one-line error must contain)."""
    up = [
        "upgrade",
        "--old",
        "zoo/old",
        "--new",
        "zoo/new",
        "--corpus",
        world["corpus"],
        "--pairs",
        world["pairs"],
        "--eval",
        world["eval"],
        "--out",
        str(tmp / "out"),
    ]

    def swap(flag: str, value: str) -> list[str]:
        args = list(up)
        args[args.index(flag) + 1] = value
        return args

    (tmp / "not.parquet").write_text("not parquet")
    (tmp / "empty").mkdir()
    pq.write_table(pa.table({"caption": pa.array([], pa.string())}), tmp / "no-rows.parquet")
    return {
        "corpus: missing text column": (up + ["--text-column", "text"], "--text-column"),
        "corpus: not a Parquet file": (swap("--corpus", str(tmp / "not.parquet")), "not.parquet"),
        "corpus: nothing left after the length filter": (up + ["--min-chars", "100000"], "--min-chars"),
        "corpus: no such file": (swap("--corpus", str(tmp / "missing.parquet")), "missing.parquet"),
        "corpus: empty folder": (swap("--corpus", str(tmp / "empty")), "empty"),
        "pairs: missing caption column": (
            swap("--pairs", _drop(world["pairs"], "caption", tmp / "p1.parquet")),
            "caption",
        ),
        "pairs: an image that does not decode": (
            swap("--pairs", _broken_image(world["pairs"], tmp / "p2.parquet")),
            "decode",
        ),
        "pairs: no rows": (swap("--pairs", str(tmp / "no-rows.parquet")), "no-rows.parquet"),
        "eval: missing image column": (swap("--eval", _drop(world["eval"], "image", tmp / "e1.parquet")), "image"),
        "old model: no such folder": (swap("--old", str(tmp / "no-model")), "no-model"),
        "out: a file in the way": (swap("--out", str(tmp / "not.parquet")), "not.parquet"),
        "gallery: no id column": (up + ["--gallery", world["corpus"]], "'embedding'"),
        "embed: image modality on texts": (
            [
                "embed",
                "--model",
                "zoo/old",
                "--input",
                world["corpus"],
                "--modality",
                "image",
                "--out",
                str(tmp / "e.parquet"),
            ],
            "--modality text",
        ),
        "embed: text modality on images": (
            [
                "embed",
                "--model",
                "zoo/old",
                "--input",
                _drop(world["pairs"], "caption", tmp / "images.parquet"),
                "--modality",
                "text",
                "--out",
                str(tmp / "e.parquet"),
            ],
            "--modality image",
        ),
    }


def run_case(args: list[str], needle: str, state: Path) -> dict:
    env = {**os.environ, "XBT_STATE_DIR": str(state), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600
    )
    seconds = time.perf_counter() - t0
    lines = proc.stderr.strip().splitlines()
    return {
        "seconds": round(seconds, 2),
        "exit": proc.returncode,
        "stderr": lines[-1] if lines else "",
        "one_line": len(lines) == 1,
        "names_it": needle in proc.stderr,
        "met": proc.returncode != 0 and len(lines) == 1 and needle in proc.stderr and seconds < GOAL_S,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair-images", type=int, default=20_000, help="pairs of the world the bad inputs start from")
    ap.add_argument("--corpus-captions", type=int, default=115_000)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        spec = shapes.WorldSpec(corpus_captions=a.corpus_captions, pair_images=a.pair_images)
        world = shapes.write_world(tmp / "world", spec)
        results = {name: run_case(args, needle, tmp / "state") for name, (args, needle) in cases(world, tmp).items()}
    print(
        json.dumps(
            {
                "machine": machine(),
                "goal_s": GOAL_S,
                "pair_images": a.pair_images,
                "corpus_captions": a.corpus_captions,
                "cases": results,
                "all_met": all(r["met"] for r in results.values()),
                "slowest_s": max(r["seconds"] for r in results.values()),
            }
        )
    )


if __name__ == "__main__":
    main()
