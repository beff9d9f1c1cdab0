"""Where Prefect and MLflow live, and a fast check that a configured server answers.

Nothing configured: each `xbt` run gets a private Prefect API on loopback
(`prefect_api`) and MLflow a SQLite store under the state folder.
PREFECT_API_URL / MLFLOW_TRACKING_URI point at servers; one that does not
answer fails the run in seconds, before any training.

The private API is Prefect's own server app, as Prefect's temporary server
runs it, but in a session of its own: Ctrl-C or a SIGTERM to the terminal's
process group reaches only xbt, whose run is then recorded as crashed and
which exits at once. Prefect's temporary server shared xbt's process group,
died first, and left xbt retrying the dead API for two and a half minutes
before a ConnectError. The private one exits when xbt does, however xbt ends
(it watches its parent), so a SIGKILL leaves no server behind.

    python -m tasks.servers --serve-prefect-api PORT --parent PID   (what xbt starts)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from xbtcore.lock import file_lock

from .common import state_dir

CHECK_TIMEOUT_S = 5.0


class ServerUnreachable(RuntimeError):
    """A configured Prefect or MLflow server did not answer, or MLflow cannot open its store."""


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
        return Path(uri[len("sqlite:///") :]).parent / "artifacts"
    if uri.startswith(("http://", "https://", "databricks")):
        return None
    return state_dir() / "mlflow" / "artifacts"


def _check(name: str, url: str, env: str) -> None:
    try:
        r = httpx.get(url, timeout=CHECK_TIMEOUT_S)
        r.raise_for_status()
    except httpx.HTTPError as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ServerUnreachable(
            f"{name} at {url} is unreachable ({reason}): start it (`make servers`) or unset {env}"
        ) from e


def check_tracking_server() -> None:
    """Raise ServerUnreachable where MLFLOW_TRACKING_URI names a server that does not answer, or a store
    that MLflow cannot open. A SQLite store is created or migrated here, one process at a time (two runs
    migrating one at once fail), so that the first run on a fresh state folder has nothing left to race."""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        _check("the MLflow tracking server", uri.rstrip("/") + "/health", "MLFLOW_TRACKING_URI")
    elif not uri.startswith("databricks"):
        _open_store(uri)


def _open_store(uri: str) -> None:
    from mlflow import MlflowClient

    db = Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None
    lock = file_lock(db.with_name(db.name + ".lock")) if db and db.parent.is_dir() else contextlib.nullcontext()
    with lock:
        try:
            MlflowClient(uri, uri).search_experiments(max_results=1)
        except Exception as e:  # MLflow's own types differ by store: any failure to open it is this one
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
            raise ServerUnreachable(
                f"MLFLOW_TRACKING_URI={uri}: MLflow cannot open this store ({reason}): pass a tracking server's "
                "http URL or sqlite:///PATH/mlflow.db, or unset it for a SQLite store in the state folder"
            ) from e


def check_servers() -> None:
    """Raise ServerUnreachable naming the first configured server that does not answer."""
    api = os.environ.get("PREFECT_API_URL", "").strip()
    if api:
        _check("the Prefect API", api.rstrip("/") + "/health", "PREFECT_API_URL")
    check_tracking_server()


def _start_timeout_s() -> float:
    """Prefect's own setting for its temporary server (the CLI and Makefile set 60 s: a cold start with
    migrations on a busy 2-core machine takes about 10)."""
    return float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS") or 60)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _start_private_api() -> tuple[subprocess.Popen, str]:
    """The API server in its own session, answering on a free loopback port -> (process, API URL)."""
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    for _ in range(3):  # a port taken between _free_port and the bind makes the server exit: try another
        port = _free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "tasks.servers", "--serve-prefect-api", str(port), "--parent", str(os.getpid())],
            env=env,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}/api"
        deadline = time.monotonic() + _start_timeout_s()
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        if proc.poll() is None:
            _stop(proc)
            raise ServerUnreachable(
                f"the private Prefect API did not answer at {url} within {_start_timeout_s():.0f} s: "
                "start a server (`make servers`) and set PREFECT_API_URL"
            )
    raise ServerUnreachable(
        f"the private Prefect API exited at start (code {proc.returncode}), three times: "
        "start a server (`make servers`) and set PREFECT_API_URL"
    )


@contextlib.contextmanager
def prefect_api():
    """Flows run inside this: against PREFECT_API_URL when it is set, else against a private API
    for this process only (see the module docstring), stopped on the way out. The setting, not the
    variable alone: a Prefect profile or a test harness may set it too."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return

    proc, url = _start_private_api()
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield
    finally:
        _drain_prefect_clients()
        _stop(proc)


def _drain_prefect_clients(timeout_s: float = 10.0) -> None:
    """Send the run's queued logs and events while the API still answers; drained at interpreter exit
    instead (Prefect's default) they would wait on an API already stopped."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=timeout_s)


def _serve_prefect_api(port: int, parent: int) -> None:
    """Prefect's server app on 127.0.0.1:port until SIGTERM or until `parent` is gone."""
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(
            "prefect.server.api.server:create_app",
            factory=True,
            host="127.0.0.1",
            port=port,
            log_level="error",
            lifespan="on",
        )
    )

    def watch_parent():
        while os.getppid() == parent:  # a dead parent re-parents us
            time.sleep(0.5)
        server.should_exit = True

    threading.Thread(target=watch_parent, daemon=True).start()
    server.run()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="the private Prefect API of one xbt run (started by xbt)")
    ap.add_argument("--serve-prefect-api", type=int, required=True, metavar="PORT")
    ap.add_argument("--parent", type=int, required=True, help="exit when this process is gone")
    a = ap.parse_args()
    _serve_prefect_api(a.serve_prefect_api, a.parent)
