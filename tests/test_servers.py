"""The export line `make servers` prints: what a user pastes to reach the servers with state kept local."""

import os
import shlex
import subprocess
import threading
from pathlib import Path

from flows.servers import export_line


def test_export_line_points_at_servers_and_keeps_state_local(tmp_path):
    state, bin_dir = tmp_path / "my repo" / ".state", tmp_path / "my repo" / ".venv" / "bin"  # a space in the path
    bin_dir.mkdir(parents=True)
    (bin_dir / "prefect").write_text("#!/bin/sh\necho fake prefect\n")
    (bin_dir / "prefect").chmod(0o755)
    line = export_line(state, bin_dir, 4200, 5000)
    # Run it in a clean shell, as a user would paste it, and read back what it set.
    names = ["PREFECT_API_URL", "MLFLOW_TRACKING_URI", "XBT_STATE_DIR", "PREFECT_HOME", "DO_NOT_TRACK"]
    script = line + "; prefect; " + "; ".join(f"echo {n}=${n}" for n in names)
    out = subprocess.run(
        ["sh", "-c", script],
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home")},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert out[0] == "fake prefect"  # the venv's prefect comes first on PATH
    got = dict(x.split("=", 1) for x in out[1:])
    assert got == {
        "PREFECT_API_URL": "http://127.0.0.1:4200/api",
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000",
        "XBT_STATE_DIR": str(state),
        "PREFECT_HOME": str(Path(state) / "prefect"),
        "DO_NOT_TRACK": "true",
    }
    assert shlex.split(line)[0] == "export"


def test_a_fresh_sqlite_store_is_created_by_one_process_at_a_time(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from tasks.servers import check_tracking_server
    from xbtcore.lock import file_lock

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # Two runs migrating a fresh store at once fail ("duplicate column name"): the second waits for the first.
    with file_lock(tmp_path / "mlflow.db.lock"):  # another process creating the store
        second = threading.Thread(target=check_tracking_server)
        second.start()
        second.join(5)
        assert second.is_alive() and not db.exists()
    second.join(120)
    assert not second.is_alive()
    assert MlflowClient(uri, uri).search_experiments()  # made whole: the default experiment is there


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_servers_share_their_registry_with_xbt_without_them_and_stop_on_sigterm(tmp_path):
    """`make servers`' MLflow keeps artifacts as files under the state folder: an experiment created through
    the server takes artifacts from a run on the SQLite store without it (one behind the server's artifact
    proxy, mlflow-artifacts:/, failed there after training). A taken port is refused by name, and SIGTERM
    stops both servers."""
    import signal
    import sys
    import time

    import pytest
    from mlflow import MlflowClient

    from flows.servers import check_port_free

    state = tmp_path / "state"
    prefect_port, mlflow_port = _free_port(), _free_port()
    env = {**os.environ, "XBT_STATE_DIR": str(state), "PREFECT_HOME": str(state / "prefect")}
    env.pop("MLFLOW_TRACKING_URI", None)
    ports = ["--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.servers", *ports],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        line = next((x for x in proc.stdout if x.startswith("export ")), "")  # printed once both answer
        assert f"MLFLOW_TRACKING_URI=http://127.0.0.1:{mlflow_port}" in line, line
        with pytest.raises(SystemExit, match=rf"--mlflow-port {mlflow_port}: 127.0.0.1:{mlflow_port} is in use"):
            check_port_free(mlflow_port, "--mlflow-port")

        served = MlflowClient(f"http://127.0.0.1:{mlflow_port}")
        exp = served.create_experiment("xbt/space")
        assert not served.get_experiment(exp).artifact_location.startswith("mlflow-artifacts:")
        local_uri = f"sqlite:///{state / 'mlflow' / 'mlflow.db'}"
        local = MlflowClient(local_uri, local_uri)
        run = local.create_run(exp)
        (tmp_path / "report.json").write_text("{}")
        local.log_artifact(run.info.run_id, str(tmp_path / "report.json"))
        assert [f.path for f in served.list_artifacts(run.info.run_id)] == ["report.json"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            check_port_free(prefect_port, "--prefect-port")
            check_port_free(mlflow_port, "--mlflow-port")
            break
        except SystemExit:
            time.sleep(0.5)
    else:
        raise AssertionError("a server still listens after SIGTERM")
