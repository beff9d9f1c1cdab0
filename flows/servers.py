"""Start a Prefect API server and an MLflow tracking server on loopback, state under the state folder.

    python -m flows.servers            # Ctrl-C stops both
    export PATH=$PWD/.venv/bin:$PATH PREFECT_API_URL=http://127.0.0.1:4200/api \
        MLFLOW_TRACKING_URI=http://127.0.0.1:5000 XBT_STATE_DIR=$PWD/.state \
        PREFECT_HOME=$PWD/.state/prefect DO_NOT_TRACK=true      (it prints this line)

Both stay on 127.0.0.1: nothing is exposed beyond this machine. MLflow keeps artifacts as plain files
under the state folder (no artifact proxy), so `xbt` without the server reads and writes the same registry.
A port already in use, or a server that exits, ends this with one line naming it and a non-zero code;
Ctrl-C, SIGTERM and SIGHUP stop both servers.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def _wait(url: str, what: str, proc: subprocess.Popen, timeout_s: float = 90) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"xbt: error: {what} exited (code {proc.returncode}) before it answered at {url}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"xbt: error: {what} did not answer at {url} within {timeout_s:.0f} s")


def export_line(state: Path, bin_dir: Path, prefect_port: int, mlflow_port: int) -> str:
    """The shell line that points `prefect`, `xbt` and the worker at these servers, with every other piece of
    state under the state folder too (no ~/.prefect) and telemetry off (no ~/.config/mlflow)."""
    q = shlex.quote
    return (
        f'export PATH="{bin_dir}:$PATH" PREFECT_API_URL=http://127.0.0.1:{prefect_port}/api '
        f"MLFLOW_TRACKING_URI=http://127.0.0.1:{mlflow_port} XBT_STATE_DIR={q(str(state))} "
        f"PREFECT_HOME={q(str(state / 'prefect'))} DO_NOT_TRACK=true"
    )


def check_port_free(port: int, flag: str) -> None:
    """SystemExit naming `flag` where something already listens on 127.0.0.1:port: a server started there
    would exit, while the health check was answered by the one already there."""
    with socket.socket() as sock:
        # as the servers bind: a closed connection's TIME_WAIT does not hold the port
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as e:
            raise SystemExit(
                f"xbt: error: {flag} {port}: 127.0.0.1:{port} is in use ({e.strerror}): stop what listens there "
                f"or pass another {flag}"
            ) from e


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM and SIGHUP stop both servers as Ctrl-C does


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefect-port", type=int, default=4200, help="the Prefect API and UI's port (default: 4200)")
    ap.add_argument("--mlflow-port", type=int, default=5000, help="the MLflow server's port (default: 5000)")
    a = ap.parse_args()
    check_port_free(a.prefect_port, "--prefect-port")
    check_port_free(a.mlflow_port, "--mlflow-port")
    state = Path(os.environ.get("XBT_STATE_DIR") or Path.cwd() / ".state").absolute()
    (state / "mlflow" / "artifacts").mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PREFECT_HOME": os.environ.get("PREFECT_HOME", str(state / "prefect")),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": f"http://127.0.0.1:{a.prefect_port}/api",  # the UI's calls go to this port too
        # MLflow's job runner (a huey consumer per job type) serves GenAI jobs xbt never starts
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "DO_NOT_TRACK": "true",
    }
    env.pop("PREFECT_API_URL", None)
    bin_dir = Path(sys.executable).parent
    servers = {
        "the Prefect server": [
            str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(a.prefect_port)
        ],
        # artifacts as files under the state folder, not behind the server's proxy (mlflow-artifacts:/), which
        # a run on the SQLite store without the server could not write
        "the MLflow server": [
            str(bin_dir / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(a.mlflow_port),
            "--workers", "1",
            "--backend-store-uri", f"sqlite:///{state / 'mlflow' / 'mlflow.db'}",
            "--default-artifact-root", str(state / "mlflow" / "artifacts"), "--no-serve-artifacts",
        ],
    }  # fmt: skip
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop)
    # each in a session of its own: Ctrl-C reaches this process alone, which stops both servers quietly
    procs = {what: subprocess.Popen(cmd, env=env, start_new_session=True) for what, cmd in servers.items()}
    try:
        _wait(f"http://127.0.0.1:{a.prefect_port}/api/health", "the Prefect server", procs["the Prefect server"])
        _wait(f"http://127.0.0.1:{a.mlflow_port}/health", "the MLflow server", procs["the MLflow server"])
        print(export_line(state, bin_dir, a.prefect_port, a.mlflow_port), flush=True)
        while True:
            for what, p in procs.items():
                if p.poll() is not None:
                    print(f"xbt: error: {what} exited (code {p.returncode}); both are stopped", file=sys.stderr)
                    return 1
            time.sleep(1)
    except KeyboardInterrupt:
        return 0
    finally:
        for p in procs.values():  # each server's whole group: MLflow's workers and job consumers too
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs.values():
            p.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
