"""The corpus embedded across Dask workers: Prefect tasks on a DaskTaskRunner, each filling shards of the cache.

The embedding cache stores an entry as shards written atomically (xbtcore.cache). Here each
missing shard of a corpus entry is one Prefect task; a Dask worker loads the encoder once, embeds
the shard's rows exactly as `cached_text_embeddings` would (same rows, same batch size) and writes
it into the entry. The flow's own embed step then finds the entry whole and only reads it. A
killed run resumes with the shards that exist; no shard is embedded twice.

    --dask local:2              a LocalCluster of 2 single-threaded worker processes on this machine
    --dask tcp://HOST:8786      the scheduler of a running Dask cluster (its workers see the state folder)
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

import pyarrow.parquet as pq
from prefect import flow, task

from xbtcore.cache import SHARD_ROWS, TEXT_BATCH, EmbeddingCache, cache_model_key, fingerprint_texts

from .common import log

_ENCODERS: dict[tuple[str, str], object] = {}  # (ref, precision) -> encoder, one load per worker process


def _encoder(ref: str, precision: str = "fp32", compile_after: int | None = None):
    """The encoder at `ref` on this process's device (a worker's GPU when it has one) at `precision`, the
    flow's: its shards are the cache entry the flow's embed step reads. Its passes run torch.compile'd
    once it has embedded `compile_after` items (encoders.resolve_compile)."""
    from xbtcore.encoders import resolve_device

    from .embed import old_space_encoder  # a model, or a champion bundle whose compatible space is "old"

    if (ref, precision) not in _ENCODERS:
        _ENCODERS[ref, precision] = old_space_encoder(ref, resolve_device("auto"), precision)
    _ENCODERS[ref, precision].compile_after = compile_after
    return _ENCODERS[ref, precision]


def parse_dask(spec: str) -> dict:
    """--dask's value -> DaskTaskRunner's arguments; a bad value is a ValueError naming the forms."""
    if spec.startswith("local:") and spec.removeprefix("local:").isdigit() and int(spec.removeprefix("local:")) > 0:
        n = int(spec.removeprefix("local:"))
        return {"cluster_kwargs": {"n_workers": n, "threads_per_worker": 1, "processes": True}}
    if "://" in spec:
        return {"address": spec}
    raise ValueError(f"--dask {spec!r}: give local:N (N worker processes here) or a scheduler address tcp://HOST:PORT")


SCHEDULER_WAIT_S = 15  # how long --dask's address has to answer as a Dask scheduler


def check_scheduler(address: str, timeout_s: float = SCHEDULER_WAIT_S) -> None:
    """A Dask scheduler answers at `address` (its identity call) within timeout_s, else a ValueError naming
    it: distributed's Client waits on a port that accepts but never answers (a dashboard, another server)
    without end, and reads another protocol's bytes as a frame of exabytes."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from distributed.comm import connect

    async def identity():
        comm = await connect(address, timeout=timeout_s)
        try:
            await comm.write({"op": "identity"})
            return await comm.read()
        finally:
            comm.abort()

    fix = "pass the scheduler's address (tcp://HOST:8786 unless it was started on another port; 8787 is its dashboard)"
    where = urlsplit(address)
    if where.scheme == "tcp" and where.hostname and where.port:
        # distributed retries a refused connection until its timeout: nothing listening is told at once
        try:
            socket.create_connection((where.hostname, where.port), timeout=timeout_s).close()
        except ConnectionRefusedError as e:
            raise ValueError(f"--dask {address}: nothing listens there (connection refused): {fix}") from e
        except OSError:
            pass  # unreachable or slow: the identity call below waits and names it
    try:  # in a thread of its own: the flow's thread may have an event loop running
        with ThreadPoolExecutor(1) as pool:
            reply = pool.submit(asyncio.run, asyncio.wait_for(identity(), timeout_s)).result()
    except Exception as e:
        raise ValueError(
            f"--dask {address}: no Dask scheduler answered there in {timeout_s:g} s ({type(e).__name__}): {fix}"
        ) from e
    if not isinstance(reply, dict) or reply.get("type") != "Scheduler":
        raise ValueError(f"--dask {address}: what answers there is not a Dask scheduler: {fix}")


def caption_rows(path: str, start: int, stop: int) -> list[str]:
    """Rows [start, stop) of a corpus Parquet file's caption column, reading only the row groups that hold them."""
    f = pq.ParquetFile(path)
    groups, first, offset = [], None, 0
    for g in range(f.num_row_groups):
        n = f.metadata.row_group(g).num_rows
        if offset < stop and offset + n > start:
            groups.append(g)
            first = offset if first is None else first
        offset += n
    table = f.read_row_groups(groups, columns=["caption"])
    return table.slice(start - first, stop - start).column(0).to_pylist()


@task(name="embed-shard", retries=1)
def embed_shard(
    cache_root: str,
    ref: str,
    corpus_path: str,
    entry: dict,
    shard: int,
    precision: str = "fp32",
    compile_after: int | None = None,
) -> int:
    """Shard `shard` of a corpus entry by the encoder at `ref`, written into the cache -> rows embedded."""
    cache = EmbeddingCache(cache_root)
    d = cache.entry_dir(entry["model"], entry["data"], "text")
    if cache.shard_path(d, shard).exists():  # a retried or resumed task
        return 0
    start = shard * entry["shard_rows"]
    stop = min(start + entry["shard_rows"], entry["rows"])
    texts = caption_rows(corpus_path, start, stop)
    emb = _encoder(ref, precision, compile_after).embed_texts(texts, batch_size=TEXT_BATCH)
    cache.write_shard(d, shard, emb, stop - start)
    return stop - start


def missing_shards(
    cache_root: str, refs: list[str], corpus_path: str, shard_rows: int = SHARD_ROWS, precision: str = "fp32"
) -> list[tuple]:
    """(ref, entry, shard) of every shard the corpus entries of `refs` (models or bundles) at `precision` still
    lack; the entries' manifests are written here, so the workers only add shards."""
    texts = pq.read_table(corpus_path, columns=["caption"]).column("caption").to_pylist()
    data_fp, cache = fingerprint_texts(texts), EmbeddingCache(cache_root)
    plan = []
    for ref in refs:
        model_fp = cache_model_key(_encoder(ref, precision))
        d, info = cache.open_entry(model_fp, data_fp, "text", len(texts), {"model_ref": ref}, shard_rows)
        entry = {"model": model_fp, "data": data_fp, "rows": len(texts), "shard_rows": shard_rows}
        plan += [(ref, entry, i) for i in range(info["shards"]) if not cache.shard_path(d, i).exists()]
    return plan


@flow(name="xbt-embed-corpus-sharded")
def embed_corpus_sharded(
    cache_root: str, corpus_path: str, plan: list[tuple], precision: str = "fp32", compile_after: int | None = None
) -> dict:
    """Each (ref, entry, shard) of `plan` as its own task on the flow's task runner -> {"shards", "rows"}."""
    futures = [
        embed_shard.submit(cache_root, ref, corpus_path, entry, i, precision, compile_after) for ref, entry, i in plan
    ]
    rows = sum(f.result() for f in futures)
    log().info("embedded %d corpus rows in %d shards across the Dask workers", rows, len(futures))
    return {"shards": len(futures), "rows": rows}


def embed_corpus_on_dask(
    spec: str,
    cache_root: str,
    refs: list[str],
    corpus_path: str,
    precision: str = "fp32",
    compile_after: int | None = None,
    **kw,
) -> dict:
    """The missing shards of the corpus entries of `refs` at `precision` (`compile_after`: resolve_compile's),
    on a DaskTaskRunner made from --dask's value; no cluster starts when the cache already holds them all."""
    from prefect_dask import DaskTaskRunner

    plan = missing_shards(cache_root, refs, corpus_path, precision=precision, **kw)
    if not plan:
        return {"shards": 0, "rows": 0}
    runner = DaskTaskRunner(**parse_dask(spec))
    sharded = embed_corpus_sharded.with_options(task_runner=runner)
    return sharded(cache_root, corpus_path, plan, precision, compile_after)
