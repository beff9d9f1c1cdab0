"""Corpus extraction throughput and peak memory: the product's DuckDB step vs pandas.

    .venv/bin/python bench/extract_bench.py [--rows 10000000] [--files 100] [--repeats 2]

Synthesises a text corpus once (cached under $XBT_STATE_DIR/bench, .state/bench
by default, and reused while its size matches): `--rows` rows over `--files`
Parquet files, made of world captions with prefixes and suffixes, over a
quarter exact duplicates (within and across files), 1% nulls and 1% blank or
whitespace-only strings. Then, each side in its own process so peak RSS is its
own:

- ours: tasks.extract.extract_corpus (the Prefect task's function, unchanged):
  DuckDB drops nulls and blanks, keeps each text's first appearance, writes Parquet;
- pandas: read_parquet of every file, concat, dropna, strip-blank filter,
  drop_duplicates (keeps first appearance too), to_parquet.

The sides alternate `--repeats` times and each side's fastest run counts (its
peak RSS is the highest of its runs). Both write the same artefact, so every
output is checked to hold the same texts in the same order (count and
SHA-256). Prints one JSON object. Extraction runs on the CPU only (DuckDB and
pandas have no GPU path), so there is no --device flag.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import BENCH_STATE, Clock, emit, machine, progress, rss_mb, run_child  # noqa: E402

GOAL_RATIO = 5.0
GOAL_PEAK_MB = 4096
GOAL_ROWS = 10_000_000
SEED = 0
POOL = 200_000
PREFIXES = [
    "",
    "a photo of ",
    "an image showing ",
    "picture: ",
    "drawing of ",
    "a render of ",
    "clip art: ",
    "illustration, ",
    "a snapshot of ",
    "icon: ",
]
SUFFIXES = [
    "",
    " on a grey background",
    ", low resolution",
    " (stock image)",
    ", flat colours",
    " in a frame",
    ", centred",
    " - free download",
    ", 64 px",
    " #shapes",
]
BLANKS = ["", " ", "  ", "\t", " \n ", "   "]


def corpus_dir(rows: int, files: int) -> Path:
    return BENCH_STATE / f"corpus-{rows}x{files}"


def synthesise(rows: int, files: int) -> Path:
    """`rows` rows of a `caption` column over `files` Parquet files (cached)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from worlds.shapes import corpus_captions

    out = corpus_dir(rows, files)
    done = out / "DONE"
    if done.exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    pool = corpus_captions(SEED, min(POOL, rows))
    variants = [p + "{}" + s for p in PREFIXES for s in SUFFIXES]  # 100 framings of each caption
    # rows draws from 2 x rows ids repeat an id in about 21% of rows; the pool's own repeated
    # captions bring the exact duplicates to about 28% of the non-blank rows
    n_ids = 2 * rows
    rng = np.random.default_rng(SEED)
    per_file = -(-rows // files)
    for i in range(files):
        n = min(per_file, rows - i * per_file)
        if n <= 0:
            break
        ids = rng.integers(0, n_ids, size=n)
        kind = rng.random(n)  # < 0.01: null, < 0.02: blank
        texts = [
            None
            if k < 0.01
            else BLANKS[j % len(BLANKS)]
            if k < 0.02
            else variants[(j // len(pool)) % len(variants)].format(pool[j % len(pool)])
            for j, k in zip(ids.tolist(), kind.tolist())
        ]
        pq.write_table(
            pa.table({"caption": pa.array(texts, pa.string()), "id": np.arange(n) + i * per_file}),
            out / f"part-{i:05d}.parquet",
        )
    done.write_text(json.dumps({"rows": rows, "files": files, "seconds": round(time.perf_counter() - t0, 1)}))
    progress(f"synthesised {rows:,} rows in {files} files in {time.perf_counter() - t0:.0f}s -> {out}")
    return out


def digest(path: Path) -> tuple[int, str]:
    """(rows, SHA-256 of the texts in order) of an extracted corpus file."""
    import pyarrow.parquet as pq

    h = hashlib.sha256()
    pf = pq.ParquetFile(path)
    rows = 0
    for batch in pf.iter_batches(columns=["caption"], batch_size=1 << 20):
        texts = batch.column(0).to_pylist()
        rows += len(texts)
        h.update("".join(t + "\x00" for t in texts).encode())  # independent of batch boundaries
    return rows, h.hexdigest()[:16]


def run_ours(corpus: Path, out: Path) -> Clock:
    from tasks.extract import extract_corpus

    with Clock() as clock:
        extract_corpus.fn(str(corpus), str(out))
    return clock


def run_pandas(corpus: Path, out: Path) -> Clock:
    import pandas as pd

    files = sorted(corpus.glob("*.parquet"))
    with Clock() as clock:
        texts = pd.concat([pd.read_parquet(f, columns=["caption"])["caption"] for f in files], ignore_index=True)
        texts = texts.dropna()
        texts = texts[texts.str.strip() != ""]
        texts = texts.drop_duplicates()
        pd.DataFrame({"caption": texts}).to_parquet(out, index=False)
    return clock


def side(name: str, corpus: Path, out: Path) -> dict:
    """One side, run in this (child) process: -> timings and the output's digest."""
    if name == "ours":
        import tasks.extract  # noqa: F401  (imports out of the timing; rss_before_mb is after them)
    else:
        import pandas  # noqa: F401

    rss0 = rss_mb()
    clock = (run_ours if name == "ours" else run_pandas)(corpus, out)
    rows, sha = digest(out)
    return {
        "side": name,
        "seconds": round(clock.wall, 3),
        "cpu_seconds": round(clock.cpu, 3),
        "rss_before_mb": rss0,
        "rows_out": rows,
        "sha256": sha,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=GOAL_ROWS, help="corpus rows (the goal is stated at 10 million)")
    p.add_argument("--files", type=int, default=100, help="Parquet files the rows are spread over")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs per side; the fastest of each counts")
    p.add_argument("--side", choices=["ours", "pandas"], help=argparse.SUPPRESS)  # child mode
    args = p.parse_args(argv)

    corpus = corpus_dir(args.rows, args.files)
    outputs = BENCH_STATE / "extract-out"
    if args.side:
        return emit(side(args.side, corpus, outputs / f"{args.side}.parquet"))

    corpus = synthesise(args.rows, args.files)
    outputs.mkdir(parents=True, exist_ok=True)
    for f in sorted(corpus.glob("*.parquet")):  # the page cache warm for both sides alike
        f.read_bytes()
    child = [str(Path(__file__).resolve()), "--rows", str(args.rows), "--files", str(args.files)]
    runs = {"ours": [], "pandas": []}
    for _ in range(args.repeats):  # alternating, so a burst of load from other jobs hits both sides alike
        for name, done in runs.items():
            done.append(run_child([*child, "--side", name]))
            progress(f"{name}: {done[-1]['seconds']:.1f}s, peak {done[-1]['peak_rss_mb']:.0f} MiB")
    ours, ref = (min(runs[name], key=lambda r: r["seconds"]) for name in ("ours", "pandas"))
    shutil.rmtree(outputs)  # the extracted corpora are scratch: only their digests are compared
    result = {
        "bench": "extract",
        "machine": machine("cpu"),
        "cpu_cores": len(os.sched_getaffinity(0)),  # DuckDB's default thread count
        "rows": args.rows,
        "files": args.files,
        "distinct_rows": ours["rows_out"],
        "ours_s": ours["seconds"],
        "pandas_s": ref["seconds"],
        "ours_rows_per_s": round(args.rows / ours["seconds"]),
        "pandas_rows_per_s": round(args.rows / ref["seconds"]),
        "ratio": round(ref["seconds"] / ours["seconds"], 2),
        "ratio_cpu": round(ref["cpu_seconds"] / ours["cpu_seconds"], 2),
        "ours_cpu_s": ours["cpu_seconds"],
        "pandas_cpu_s": ref["cpu_seconds"],
        "ours_peak_rss_mb": max(r["peak_rss_mb"] for r in runs["ours"]),
        "pandas_peak_rss_mb": max(r["peak_rss_mb"] for r in runs["pandas"]),
        "ours_rss_after_imports_mb": ours["rss_before_mb"],
        "pandas_rss_after_imports_mb": ref["rss_before_mb"],
        "same_distinct_count": len({r["rows_out"] for rs in runs.values() for r in rs}) == 1,
        "same_output": len({r["sha256"] for rs in runs.values() for r in rs}) == 1,
        "repeats": args.repeats,
        "goal_ratio": GOAL_RATIO,
        "goal_peak_rss_mb": GOAL_PEAK_MB,
        "goal_rows": GOAL_ROWS,
    }
    return emit(result)


if __name__ == "__main__":
    main()
