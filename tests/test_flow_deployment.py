"""The deployment path of docs/deployment.md on loopback: server, deploy, run, worker --run-once, MLflow alias."""

import json
import os
import re
import subprocess
import sys
import time

import httpx
import pytest
from conftest import FAST, REPO

pytestmark = pytest.mark.slow

PREFECT = [sys.executable, "-m", "prefect"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_deploy_run_worker_registers_candidate(tiny, tmp_path):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect"),
        XBT_STATE_DIR=str(tmp_path / "state"),
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
        PWD=str(REPO),
    )
    server = subprocess.Popen(
        [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            pytest.fail("the Prefect server did not come up in 90 s")
        env["PREFECT_API_URL"] = api

        def prefect(*args, timeout=300):
            r = subprocess.run([*PREFECT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
            assert r.returncode == 0, f"prefect {' '.join(args)}:\n{r.stdout}\n{r.stderr}"
            return r.stdout

        for pool in ("xbt-cpu", "xbt-gpu"):
            prefect("work-pool", "create", pool, "--type", "process")
        prefect("--no-prompt", "deploy", "--all")
        params = {
            "old": tiny["old"],
            "new": tiny["new"],
            "corpus": tiny["corpus"],
            "pairs": tiny["pairs"],
            "eval": tiny["eval"],
            "out": str(tmp_path / "out"),
            "progress": False,
            **FAST,
        }
        out = prefect("deployment", "run", "xbt-upgrade/demo", "--param", f"params={json.dumps(params)}")
        run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", out).group(1)

        # The event trigger: `vlp.released` starts xbt-upgrade/default with parameters from the payload.
        payload = {**{k: params[k] for k in ("old", "corpus", "pairs", "eval")}, "new": tiny["new"], "out": "out/evt"}
        prefect("event", "emit", "vlp.released", "--resource-id", "vlp.tiny-new", "--payload", json.dumps(payload))
        triggered = []
        deadline = time.time() + 60
        while not triggered and time.time() < deadline:
            time.sleep(1)
            runs = httpx.post(f"{api}/flow_runs/filter", json={"deployments": {"name": {"any_": ["default"]}}}).json()
            triggered = [r for r in runs if r["parameters"].get("params", {}).get("new") == tiny["new"]]
        assert triggered and triggered[0]["parameters"]["params"]["out"] == "out/evt"

        env["PREFECT_WORKER_QUERY_SECONDS"] = "2"
        prefect("worker", "start", "--pool", "xbt-cpu", "--run-once", timeout=600)
        state = json.loads(prefect("flow-run", "inspect", run_id, "-o", "json"))["state"]
        assert state["type"] == "COMPLETED", state
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    from mlflow import MlflowClient

    c = MlflowClient(env["MLFLOW_TRACKING_URI"], env["MLFLOW_TRACKING_URI"])
    name = report["promotion"]["model"]
    assert str(c.get_model_version_by_alias(name, "candidate").version) == report["promotion"]["version"]
