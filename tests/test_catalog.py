"""The DuckDB catalog: rows land in their tables and upserts keep one row per key."""

from catalog import Catalog


def test_records_and_upserts(tmp_path):
    cat = Catalog(tmp_path / "c.duckdb")
    assert cat.rows("runs") == []  # no file yet: empty, and nothing created
    assert not (tmp_path / "c.duckdb").exists()
    cat.record_dataset("/d/pairs.parquet", "pairs", "fp1", 10)
    cat.record_dataset("/d/pairs.parquet", "pairs", "fp1", 10)
    cat.record_dataset("/d/pairs.parquet", "pairs", "fp2", 12)
    cat.record_space("old-1234", "/m/old", 24, "xbt-old-1234")
    cat.record_gallery("/g.parquet", "models:/xbt-old-1234@champion", "old-1234", "image", 5, 24)
    run = {
        "run_id": "r1",
        "method": "xbt",
        "old": "/m/old",
        "new": "/m/new",
        "root_model": "/m/old",
        "space": "old-1234",
        "out_dir": "/o",
        "bundle": "/o/bundle",
        "gate_passed": True,
        "promoted": True,
        "mlflow_model": "xbt-old-1234",
        "mlflow_version": "1",
        "report": "/o/report.json",
    }
    cat.record_run(run)
    cat.record_run({**run, "promoted": False})
    cat.record_lineage("old-1234", "/m/old", "/m/new", "/o/bundle", "xbt-old-1234", "1", "r1")

    assert [(r["fingerprint"], r["rows"]) for r in cat.rows("datasets")] == [("fp1", 10), ("fp2", 12)]
    assert [r["space"] for r in cat.rows("spaces")] == ["old-1234"]
    assert cat.rows("galleries")[0]["model"] == "models:/xbt-old-1234@champion"
    runs = cat.rows("runs")
    assert len(runs) == 1 and runs[0]["promoted"] is False and not runs[0]["finished"]
    cat.finish_run("r1")
    assert cat.rows("runs")[0]["finished"] is True
    assert cat.rows("lineage")[0]["mlflow_version"] == "1"


def _record_many(path: str, worker: int, n: int) -> None:
    cat = Catalog(path)
    for i in range(n):
        cat.record_dataset(f"/d/{worker}-{i}.parquet", "corpus", "fp", i)


def test_commands_sharing_a_state_folder_take_turns_at_the_catalog(tmp_path):
    # DuckDB lets one process at a time open the file: four writers at once each record every row
    import multiprocessing

    path = str(tmp_path / "c.duckdb")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_record_many, args=(path, w, 15)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert sorted(r["path"] for r in Catalog(path).rows("datasets")) == sorted(
        f"/d/{w}-{i}.parquet" for w in range(4) for i in range(15)
    )


def _hold_open(path, seconds: float):
    """A DuckDB session outside xbt holding the catalog file for `seconds`; -> the process, once it holds it."""
    import subprocess
    import sys

    code = f"import duckdb, time; c = duckdb.connect({str(path)!r}); print('open', flush=True); time.sleep({seconds})"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "open"
    return proc


def test_a_duckdb_session_holding_the_catalog_is_waited_for_then_named(tmp_path, monkeypatch):
    import time

    import pytest

    import catalog.store
    from xbtcore.data import InputError

    path = tmp_path / "c.duckdb"
    Catalog(path).record_dataset("/d/a.parquet", "pairs", "fp", 1)
    holder = _hold_open(path, 1.5)
    start = time.monotonic()
    Catalog(path).record_dataset("/d/b.parquet", "pairs", "fp", 2)  # waits for the session to end
    assert time.monotonic() - start > 0.5 and holder.wait(10) == 0
    assert [r["path"] for r in Catalog(path).rows("datasets")] == ["/d/a.parquet", "/d/b.parquet"]

    monkeypatch.setattr(catalog.store, "LOCK_WAIT_S", 0.5)
    holder = _hold_open(path, 60)
    try:
        with pytest.raises(
            InputError,
            match=rf"{path}: xbt's catalog is held open by another DuckDB session "
            rf"\(pid {holder.pid}\).*close that session",
        ):
            Catalog(path).record_dataset("/d/c.parquet", "pairs", "fp", 3)
    finally:
        holder.kill()
        holder.wait()
    assert [r["path"] for r in Catalog(path).rows("datasets")] == ["/d/a.parquet", "/d/b.parquet"]
