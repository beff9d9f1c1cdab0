"""What every task shares: where state lives, how steps are cached, input fingerprints.

State (Prefect results, the embedding cache, the MLflow store, the catalog,
the built-in world) lives under one folder: `XBT_STATE_DIR`, else `.state/`
of the working directory.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from prefect.cache_policies import INPUTS, TASK_SOURCE

# A finished step is skipped when its inputs (which carry the fingerprints of
# the files they name) and its code are unchanged.
CACHED = dict(cache_policy=INPUTS + TASK_SOURCE, persist_result=True)
# Retries only where a step talks to a disk or a server that can hiccup.
IO_RETRIES = dict(retries=2, retry_delay_seconds=2)


def state_dir() -> Path:
    return Path(os.environ.get("XBT_STATE_DIR") or Path.cwd() / ".state").expanduser().absolute()


def results_dir() -> Path:
    """Prefect result storage (a Path: a plain string would be read as a block name)."""
    return state_dir() / "results"


def cache_dir() -> Path:
    return state_dir() / "cache"


def digest(*parts) -> str:
    """A short, stable hash of JSON-able parts (paths, settings, fingerprints): cache keys and names."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint_files(paths) -> str:
    """Names, sizes and modification times of files (folders: every file inside)."""
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            st = f.stat()
            h.update(f"{f.absolute()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def fingerprint_content(path) -> str:
    """Hash of file contents (folders: every file, by relative name): the same
    bundle rebuilt elsewhere has the same fingerprint."""
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode() + b"\x00")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def absolute_ref(ref: str) -> str:
    """A local directory as an absolute path (the cache keys models by this string); a hub id as is."""
    p = Path(ref).expanduser()
    return str(p.absolute()) if p.exists() else ref


def log():
    """The run logger inside a flow or task run; a plain logger when a task's .fn() runs bare (tests)."""
    import logging

    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("xbt")
