"""What every task shares: where state lives, how steps are cached, input fingerprints.

State (Prefect results, the embedding cache, the MLflow store, the catalog,
the built-in world) lives under one folder: `XBT_STATE_DIR`, else `.state/`
of the working directory.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy

# Retries only where a step talks to a disk or a server that can hiccup.
IO_RETRIES = dict(retries=2, retry_delay_seconds=2)


def state_dir() -> Path:
    return Path(os.environ.get("XBT_STATE_DIR") or Path.cwd() / ".state").expanduser().absolute()


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


def step_path(work: Path, name: str, *inputs, suffix: str = "") -> str:
    """Where a step writes its output: named by a digest of its inputs, so a run with other inputs
    in the same folder writes beside it, and a cached step's path always holds what these inputs made."""
    return str(Path(work) / f"{name}-{digest(*inputs)}{suffix}")


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


@dataclass
class WhileOutputExists(CachePolicy):
    """A finished step is skipped when its inputs (which carry the fingerprints of the files they
    read, and its output path, named by `step_path`), its code and the state folder are unchanged,
    and the output it wrote (its `out` input) is still there; a step whose output was removed runs
    again."""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kw) -> str | None:
        policy = INPUTS - "progress" + TASK_SOURCE
        key = policy.compute_key(task_ctx=task_ctx, inputs=inputs, flow_parameters=flow_parameters, **kw)
        if key is None:
            return None
        key = digest(key, str(state_dir()))  # each state folder (a deployment, a test) keeps its own results
        out = inputs.get("out")
        if out is not None and not Path(out).exists():
            _forget(key)
        return key


def _forget(key: str) -> None:
    """Remove the result record of `key`, so the step runs again and records anew."""
    from prefect.results import get_result_store

    store = get_result_store()
    storage = store.metadata_storage or store.result_storage
    base = getattr(storage, "basepath", None)
    if base is not None:
        Path(base, key).unlink(missing_ok=True)


_STATES: dict[str, dict[str, str]] = {}  # flow run id -> {cached step: its final state}


def _record_state(task, task_run, state) -> None:
    _STATES.setdefault(str(task_run.flow_run_id), {})[task.name] = state.name


def step_states(flow_run_id) -> dict[str, str]:
    """Each cached step of a flow run by name, with its final state in this process (Completed, Cached);
    a step run twice (one per candidate) keeps its last."""
    return dict(_STATES.get(str(flow_run_id), {}))


CACHED = dict(cache_policy=WhileOutputExists(), persist_result=True, on_completion=[_record_state])


def absolute_ref(ref: str) -> str:
    """A local directory as its absolute path, `..` and symlinks resolved (the cache keys models by this
    string, so each folder has one); a hub id as is."""
    p = Path(ref).expanduser()
    return str(p.resolve()) if p.exists() else ref


def log():
    """The run logger inside a flow or task run; a plain logger when a task's .fn() runs bare (tests)."""
    import logging

    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("xbt")
