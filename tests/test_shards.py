"""The corpus embedded across two Dask workers (tasks/shards.py) equals one process's, and resumes by shard."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import upgrade_args, xbt

from tasks.shards import caption_rows, embed_corpus_on_dask, parse_dask
from xbtcore.cache import CacheStats, EmbeddingCache, cached_text_embeddings
from xbtcore.encoders import DualEncoder

SHARD_ROWS = 256


def test_dask_values_name_the_forms_they_take():
    assert parse_dask("local:2")["cluster_kwargs"]["n_workers"] == 2
    assert parse_dask("tcp://10.0.0.5:8786") == {"address": "tcp://10.0.0.5:8786"}
    for bad in ("local:0", "local:x", "somehost"):
        with pytest.raises(ValueError, match="local:N"):
            parse_dask(bad)


def test_a_shard_reads_its_rows_across_row_groups(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"caption": [str(i) for i in range(1000)]}), path, row_group_size=128)
    for start, stop in [(0, 10), (120, 300), (256, 384), (990, 1000), (0, 1000)]:
        assert caption_rows(str(path), start, stop) == [str(i) for i in range(start, stop)]


@pytest.mark.slow
def test_the_corpus_embedded_across_two_dask_workers_equals_one_process(tiny, tmp_path, prefect_harness):
    texts = list(dict.fromkeys(pq.read_table(tiny["corpus"]).column("caption").to_pylist()))[:1000]
    corpus = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"caption": texts}), corpus)
    refs = [tiny["new"], tiny["old"]]
    shards = -(-len(texts) // SHARD_ROWS)

    done = embed_corpus_on_dask("local:2", str(tmp_path / "cache"), refs, str(corpus), shard_rows=SHARD_ROWS)
    assert done == {"shards": 2 * shards, "rows": 2 * len(texts)}
    for ref in refs:
        encoder = DualEncoder.from_pretrained(ref)
        stats = CacheStats()
        sharded = cached_text_embeddings(
            EmbeddingCache(tmp_path / "cache"), encoder, texts, stats=stats, shard_rows=SHARD_ROWS
        )
        assert stats.computed_rows == 0  # the workers filled every shard: the flow only reads
        one = cached_text_embeddings(EmbeddingCache(tmp_path / "one"), encoder, texts, shard_rows=SHARD_ROWS)
        torch.testing.assert_close(sharded, one, atol=1e-5, rtol=0)

    # A run killed after some shards resumes with the rest: only the missing shard is embedded again.
    lost = next((tmp_path / "cache").glob("text-*/shard-00001.safetensors"))
    lost.unlink()
    again = embed_corpus_on_dask("local:2", str(tmp_path / "cache"), refs, str(corpus), shard_rows=SHARD_ROWS)
    assert again == {"shards": 1, "rows": SHARD_ROWS}
    whole = embed_corpus_on_dask("local:2", str(tmp_path / "cache"), refs, str(corpus), shard_rows=SHARD_ROWS)
    assert whole == {"shards": 0, "rows": 0}  # nothing missing: no cluster, no task


@pytest.mark.slow
def test_an_upgrade_with_dask_embeds_its_corpus_on_the_workers_and_reports_the_same(tiny, tmp_path):
    flags = dict(method="procrustes", val_fraction=0)
    runs = {}
    for name, extra in (("plain", {}), ("dask", {"dask": "local:2"})):
        args = [*upgrade_args(tiny, tmp_path / name, **flags, **extra), "--no-progress"]
        r = xbt(*args, env={"XBT_STATE_DIR": str(tmp_path / f"state-{name}")})  # each embeds from an empty cache
        assert r.returncode == 0, r.stderr[-2000:]
        runs[name] = (r.stdout, json.loads((tmp_path / name / "report.json").read_text()))
    assert "across the Dask workers" in runs["dask"][0] and "across the Dask workers" not in runs["plain"][0]
    assert runs["dask"][1]["recall"] == runs["plain"][1]["recall"]


def test_a_bad_dask_value_is_refused_before_anything_runs(tiny, tmp_path):
    r = xbt(*upgrade_args(tiny, tmp_path / "o", dask="somehost"))
    assert r.returncode != 0 and "local:N" in r.stderr and not (tmp_path / "o").exists()


def _listen(answer: bytes | None) -> str:
    """A port that accepts and then says `answer` (another protocol's bytes), or nothing at all."""
    import socket
    import threading

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()

    def serve():
        held = []
        while True:
            conn, _ = sock.accept()
            held.append(conn)
            if answer:
                conn.sendall(answer)

    threading.Thread(target=serve, daemon=True).start()
    return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


def test_an_address_where_no_dask_scheduler_answers_is_refused_in_seconds():
    import socket
    import time

    from distributed import LocalCluster

    from tasks.shards import check_scheduler

    listen = _listen
    for answer in (None, b"HTTP/1.0 200 OK\r\n\r\n" + b"\xff" * 4096):  # a silent port; a dashboard's page
        t0 = time.time()
        with pytest.raises(ValueError, match="no Dask scheduler answered there in 2 s .*8787 is its dashboard"):
            check_scheduler(listen(answer), timeout_s=2)
        assert time.time() - t0 < 10
    with socket.socket() as sock:  # a port nothing listens on: refused, told at once
        sock.bind(("127.0.0.1", 0))
        closed = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    t0 = time.time()
    with pytest.raises(ValueError, match=r"nothing listens there \(connection refused\): .*8787 is its dashboard"):
        check_scheduler(closed, timeout_s=30)
    assert time.time() - t0 < 10
    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster:
        check_scheduler(cluster.scheduler_address, timeout_s=10)


def test_an_upgrade_given_a_port_that_is_no_scheduler_fails_before_any_work(tiny, tmp_path):
    import time

    t0 = time.time()
    r = xbt(*upgrade_args(tiny, tmp_path / "o", dask=_listen(None)), "--no-progress", timeout=120)
    assert r.returncode == 1 and "no Dask scheduler answered there" in r.stderr.strip().splitlines()[-1]
    assert time.time() - t0 < 120 and not (tmp_path / "o" / "report.json").exists()
    assert not (tmp_path / "o" / "work").exists()  # before the corpus was read
