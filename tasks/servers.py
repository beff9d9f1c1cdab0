"""Where Prefect and MLflow live, and a fast check that a configured server answers.

Nothing configured: Prefect runs an ephemeral API and MLflow a SQLite store
under the state folder. PREFECT_API_URL / MLFLOW_TRACKING_URI point at servers;
one that does not answer fails the run in seconds, before any training.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from .common import state_dir

CHECK_TIMEOUT_S = 5.0


class ServerUnreachable(RuntimeError):
    """A configured Prefect or MLflow server did not answer."""


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        return uri
    db = state_dir() / "mlflow" / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def artifact_root() -> Path | None:
    """Where experiments keep artifacts for a local store (next to its database); a server decides its own."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).parent / "artifacts"
    if uri.startswith(("http://", "https://", "databricks")):
        return None
    return state_dir() / "mlflow" / "artifacts"


def _check(name: str, url: str, env: str) -> None:
    try:
        r = httpx.get(url, timeout=CHECK_TIMEOUT_S)
        r.raise_for_status()
    except httpx.HTTPError as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ServerUnreachable(f"{name} at {url} is unreachable ({reason}): start it (`make servers`) or unset {env}") from e


def check_servers() -> None:
    """Raise ServerUnreachable naming the first configured server that does not answer."""
    api = os.environ.get("PREFECT_API_URL", "").strip()
    if api:
        _check("the Prefect API", api.rstrip("/") + "/health", "PREFECT_API_URL")
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        _check("the MLflow tracking server", uri.rstrip("/") + "/health", "MLFLOW_TRACKING_URI")
