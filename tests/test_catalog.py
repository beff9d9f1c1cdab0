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
    assert len(runs) == 1 and runs[0]["promoted"] is False
    assert cat.rows("lineage")[0]["mlflow_version"] == "1"
