"""The corpus embedded across Dask workers vs one process, same model and texts, as JSON.

    .venv/bin/python bench/shard_bench.py [--model zoo/new] [--n 100000] [--workers 2]

One side is the flow's own embed step (`cached_text_embeddings`: one process, torch's
threads); the other is `xbt upgrade --dask local:N` (tasks/shards.py: a LocalCluster of
N single-threaded worker processes, each missing cache shard a Prefect task), both from
an empty cache. Wall time of each, including the cluster's start and each worker's model
load, and whether the embeddings agree. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emit, machine, progress, use_bench_state  # noqa: E402

ATOL = 1e-5


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="zoo/new")
    ap.add_argument("--n", type=int, default=100_000, help="distinct corpus texts of the built-in world")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json-out", default="")
    args = ap.parse_args(argv)
    use_bench_state()

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from tasks.servers import prefect_api
    from tasks.shards import embed_corpus_on_dask
    from worlds.shapes import corpus_captions
    from xbtcore.cache import CacheStats, EmbeddingCache, cached_text_embeddings
    from xbtcore.encoders import DualEncoder

    texts = list(dict.fromkeys(corpus_captions(0, 2 * args.n)))[: args.n]
    with tempfile.TemporaryDirectory() as tmp, prefect_api():
        corpus = Path(tmp) / "corpus.parquet"
        pq.write_table(pa.table({"caption": texts}), corpus)
        progress(f"one process: {len(texts):,} texts")
        t0 = time.perf_counter()
        one = cached_text_embeddings(EmbeddingCache(Path(tmp) / "one"), DualEncoder.from_pretrained(args.model), texts)
        one_s = time.perf_counter() - t0
        progress(f"{args.workers} Dask workers")
        t0 = time.perf_counter()
        done = embed_corpus_on_dask(f"local:{args.workers}", str(Path(tmp) / "dask"), [args.model], str(corpus))
        dask_s = time.perf_counter() - t0
        stats = CacheStats()
        sharded = cached_text_embeddings(
            EmbeddingCache(Path(tmp) / "dask"), DualEncoder.from_pretrained(args.model), texts, stats=stats
        )
    return emit(
        {
            "bench": "shard",
            "machine": machine(),
            "model": args.model,
            "texts": len(texts),
            "workers": args.workers,
            "shards": done["shards"],
            "one_process_s": round(one_s, 2),
            "dask_s": round(dask_s, 2),
            "speedup": round(one_s / dask_s, 2),
            "rows_left_for_the_flow": stats.computed_rows,
            "max_abs_diff": float((sharded - one).abs().max()),
            "outputs_agree": bool(torch.allclose(sharded, one, atol=ATOL, rtol=0)),
        },
        args.json_out,
    )


if __name__ == "__main__":
    main()
