"""Start a Prefect API server and an MLflow tracking server on loopback, state under the state folder.

    python -m flows.servers            # Ctrl-C stops both
    export PATH=$PWD/.venv/bin:$PATH PREFECT_API_URL=http://127.0.0.1:4200/api \
        MLFLOW_TRACKING_URI=http://127.0.0.1:5000 XBT_STATE_DIR=$PWD/.state \
        PREFECT_HOME=$PWD/.state/prefect DO_NOT_TRACK=true      (it prints this line)

Both stay on 127.0.0.1: nothing is exposed beyond this machine.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx


def _wait(url: str, what: str, timeout_s: float = 90) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefect-port", type=int, default=4200)
    ap.add_argument("--mlflow-port", type=int, default=5000)
    a = ap.parse_args()
    state = Path(os.environ.get("XBT_STATE_DIR") or Path.cwd() / ".state").absolute()
    (state / "mlflow").mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PREFECT_HOME": os.environ.get("PREFECT_HOME", str(state / "prefect")),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "true",
    }
    env.pop("PREFECT_API_URL", None)
    bin_dir = Path(sys.executable).parent
    procs = [
        subprocess.Popen(
            [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(a.prefect_port)],
            env=env,
            start_new_session=True,  # Ctrl-C reaches this process alone, which stops both servers quietly
        ),
        subprocess.Popen(
            [
                str(bin_dir / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(a.mlflow_port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{state / 'mlflow' / 'mlflow.db'}",
                "--artifacts-destination",
                str(state / "mlflow" / "artifacts"),
            ],
            env=env,
            start_new_session=True,
        ),
    ]
    try:
        _wait(f"http://127.0.0.1:{a.prefect_port}/api/health", "the Prefect server")
        _wait(f"http://127.0.0.1:{a.mlflow_port}/health", "the MLflow server")
        print(export_line(state, bin_dir, a.prefect_port, a.mlflow_port), flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
