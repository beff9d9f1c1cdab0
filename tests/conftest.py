"""Shared fixtures. Prefect, MLflow and xbt state go to a session temp folder, never ~/.prefect or .state/;
the folder is removed when every test passed and kept for a look when one failed.

The environment is set here, at import, because prefect reads its settings when
first imported.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

_SESSION_STATE = Path(tempfile.mkdtemp(prefix="xbt-test-state-"))
os.environ["XBT_STATE_DIR"] = str(_SESSION_STATE)
os.environ["PREFECT_HOME"] = str(_SESSION_STATE / "prefect")
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_SESSION_STATE / 'mlflow' / 'mlflow.db'}"
(_SESSION_STATE / "mlflow").mkdir(parents=True, exist_ok=True)
os.environ.pop("PREFECT_API_URL", None)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "true"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "60"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The suite's expectations are the CPU's float32 (what `--device auto` gives without a GPU). Hiding any
# GPU keeps them on a GPU machine too, in this process and every `xbt` it starts; the GPU path is measured
# by the benches (`--device cuda`), not here.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

REPO = Path(__file__).resolve().parents[1]


@pytest.hookimpl(trylast=True)  # after the session's fixtures are torn down
def pytest_sessionfinish(session, exitstatus):
    if exitstatus == 0:
        shutil.rmtree(_SESSION_STATE, ignore_errors=True)


def xbt(*args, env=None, timeout=600, **kw):
    """`xbt ARGS` in a fresh process from the repository, the way a user runs it (no Prefect server)."""
    full_env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *map(str, args)],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def upgrade_args(world, out, **extra):
    """`xbt upgrade`'s arguments on a world's models and files (keys old, new, corpus, pairs, eval); extra
    keyword flags (val_fraction=0.2 -> --val-fraction 0.2)."""
    args = ["upgrade", "--old", world["old"], "--new", world["new"], "--corpus", world["corpus"]]
    args += ["--pairs", world["pairs"], "--eval", world["eval"], "--out", out]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", v]
    return args


TINY_WORLD = dict(corpus_captions=1500, pair_images=96, eval_images=24)


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for every in-process flow run of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny built-in world and two untrained tiny CLIPs of different embedding sizes."""
    from worlds import shapes
    from worlds.tinyclip import TinyClipSpec, make_tiny_clip

    root = tmp_path_factory.mktemp("tiny")
    paths = shapes.write_world(root / "world", shapes.WorldSpec(**TINY_WORLD))
    old = make_tiny_clip(root / "old", TinyClipSpec(width=32, layers=1, heads=2, embed_dim=24), seed=1)
    new = make_tiny_clip(root / "new", TinyClipSpec(width=32, layers=1, heads=2, embed_dim=32), seed=2)
    return {"root": root, **paths, "old": str(old), "new": str(new)}


# Small training budgets: the flow's behaviour, not the method's quality, is under test.
FAST = {"pretrain": {"epochs": 2, "batch_size": 512}, "finetune": {"batch_size": 32, "checkpoint_every": 2}}
