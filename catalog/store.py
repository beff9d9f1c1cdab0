"""A DuckDB file recording datasets, embedding spaces, galleries, upgrade runs and lineage.

    datasets   a Parquet input by path and fingerprint, with its row count
    spaces     an embedding space: the root model a gallery was embedded with
    galleries  embeddings written by `xbt embed`, and the model (and space) that made them
    runs       one upgrade: method, models, gate verdict, bundle, MLflow version and the registry it is in;
               `finished` once its bundle and report are published (false: killed before then, its report
               path is then another run's or none)
    lineage    old -> new links of a space's chain, with their bundle and MLflow version

Rows are upserted on their key, so re-running a step records it once.

DuckDB lets one process at a time open the file. xbt commands take turns through a lock file beside it,
each holding it for a statement or two; a DuckDB session outside xbt that holds the file (a `duckdb`
shell on it, say) is waited for up to LOCK_WAIT_S, then named with the fix.
"""

from __future__ import annotations

import contextlib
import re
import time
from datetime import datetime, timezone
from pathlib import Path

import duckdb

from xbtcore.data import InputError
from xbtcore.lock import file_lock

LOCK_WAIT_S = 60.0  # how long a command waits for a DuckDB session outside xbt to let go of the catalog

SCHEMA = """
CREATE TABLE IF NOT EXISTS datasets (path VARCHAR, kind VARCHAR, fingerprint VARCHAR, rows BIGINT,
    recorded_at TIMESTAMP, PRIMARY KEY (path, kind, fingerprint));
CREATE TABLE IF NOT EXISTS spaces (space VARCHAR PRIMARY KEY, root_model VARCHAR, dim INTEGER,
    registered_model VARCHAR, recorded_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS galleries (path VARCHAR PRIMARY KEY, model VARCHAR, space VARCHAR, modality VARCHAR,
    rows BIGINT, dim INTEGER, recorded_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS runs (run_id VARCHAR PRIMARY KEY, method VARCHAR, old VARCHAR, new VARCHAR,
    root_model VARCHAR, space VARCHAR, out_dir VARCHAR, bundle VARCHAR, gate_passed BOOLEAN, promoted BOOLEAN,
    mlflow_model VARCHAR, mlflow_version VARCHAR, report VARCHAR, recorded_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS lineage (space VARCHAR, old VARCHAR, new VARCHAR, bundle VARCHAR, mlflow_model VARCHAR,
    mlflow_version VARCHAR, run_id VARCHAR, recorded_at TIMESTAMP, PRIMARY KEY (space, old, new, bundle));
ALTER TABLE runs ADD COLUMN IF NOT EXISTS registry VARCHAR;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS finished BOOLEAN;
"""
TABLES = ("datasets", "spaces", "galleries", "runs", "lineage")


class Catalog:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @contextlib.contextmanager
    def _connect(self):
        """A connection to the catalog, this process's turn held until it closes."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(self.path.with_name(self.path.name + ".lock")):
            deadline = time.monotonic() + LOCK_WAIT_S
            while True:
                try:
                    con = duckdb.connect(str(self.path))
                    break
                except duckdb.IOException as e:  # another process, not xbt, has the file open
                    if "lock" not in str(e).lower():
                        raise
                    if time.monotonic() >= deadline:
                        holder = re.search(r"PID (\d+)", str(e))
                        raise InputError(
                            self.path,
                            f"xbt's catalog is held open by another DuckDB session"
                            f"{f' (pid {holder.group(1)})' if holder else ''}, waited {LOCK_WAIT_S:.0f} s",
                            "close that session and run the command again (`xbt catalog` shows the catalog "
                            "without holding it)",
                        ) from e
                    time.sleep(0.25)
            try:
                con.execute(SCHEMA)
                yield con
            finally:
                con.close()

    def _upsert(self, table: str, row: dict) -> None:
        row = {**row, "recorded_at": datetime.now(timezone.utc).replace(tzinfo=None)}
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self._connect() as con:
            con.execute(f"INSERT OR REPLACE INTO {table} ({cols}) VALUES ({marks})", list(row.values()))

    def record_dataset(self, path: str, kind: str, fingerprint: str, rows: int) -> None:
        self._upsert("datasets", {"path": path, "kind": kind, "fingerprint": fingerprint, "rows": rows})

    def record_space(self, space: str, root_model: str, dim: int | None, registered_model: str) -> None:
        self._upsert(
            "spaces", {"space": space, "root_model": root_model, "dim": dim, "registered_model": registered_model}
        )

    def record_gallery(self, path: str, model: str, space: str | None, modality: str, rows: int, dim: int) -> None:
        self._upsert(
            "galleries", {"path": path, "model": model, "space": space, "modality": modality, "rows": rows, "dim": dim}
        )

    def record_run(self, run: dict) -> None:
        self._upsert("runs", run)

    def finish_run(self, run_id: str) -> None:
        """The run published its bundle and report."""
        with self._connect() as con:
            con.execute("UPDATE runs SET finished = true WHERE run_id = ?", [run_id])

    def record_lineage(
        self,
        space: str,
        old: str,
        new: str,
        bundle: str,
        mlflow_model: str | None,
        mlflow_version: str | None,
        run_id: str,
    ) -> None:
        self._upsert(
            "lineage",
            {
                "space": space,
                "old": old,
                "new": new,
                "bundle": bundle,
                "mlflow_model": mlflow_model,
                "mlflow_version": mlflow_version,
                "run_id": run_id,
            },
        )

    def embeddings_at(self, path: str | Path) -> dict | None:
        """The `xbt embed` record of the Parquet file at `path` (model, space, modality): the stamp in the
        file's own metadata, which travels with a copy; else its galleries row while the file holds as many
        rows as were recorded; None for a file xbt did not write, or that was written again since by something
        else."""
        import pyarrow.parquet as pq

        from xbtcore.data import read_stamp

        path = Path(path).absolute()
        if not path.is_file():
            return None
        stamp = read_stamp(path)
        if stamp is not None:
            return stamp | {"path": str(path)}
        if not self.path.exists():
            return None
        with self._connect() as con:
            cur = con.execute("SELECT * FROM galleries WHERE path = ?", [str(path)])  # the key: one row at most
            names, found = [d[0] for d in cur.description], cur.fetchone()
        if found is None:
            return None
        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception:  # not Parquet (any more): the reader of the file says so
            return None
        record = dict(zip(names, found))
        return record if record["rows"] == rows else None

    def rows(self, table: str) -> list[dict]:
        assert table in TABLES, f"unknown catalog table {table!r}"
        if not self.path.exists():
            return []
        with self._connect() as con:
            cur = con.execute(f"SELECT * FROM {table} ORDER BY recorded_at")
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]
