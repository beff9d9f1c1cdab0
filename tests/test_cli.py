"""The `xbt` command line as a user runs it: exit codes, one-line errors, embed, promote/rollback, resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO, upgrade_args, xbt


def _one_line_error(r, *needles):
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xbt: error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_usage_errors_are_one_line(tiny, tmp_path):
    _one_line_error(xbt(), "the following arguments are required")
    r = xbt("methods", "--bogus")
    _one_line_error(r, "unrecognized arguments: --bogus")
    assert not r.stderr.startswith("xbt: error: xbt:"), r.stderr  # the prefix names xbt once
    _one_line_error(xbt(*upgrade_args(tiny, tmp_path, method="magic")), "invalid choice: 'magic'")
    r = xbt("upgrade", "--old", tiny["old"])
    assert r.returncode == 2
    _one_line_error(r, "--new")


def test_bad_paths_fail_fast_with_the_path(tiny, tmp_path):
    missing = tmp_path / "nope.parquet"
    _one_line_error(xbt(*upgrade_args({**tiny, "corpus": missing}, tmp_path / "o")), str(missing), "no such file")
    _one_line_error(
        xbt(*upgrade_args({**tiny, "old": tmp_path / "no-model"}, tmp_path / "o")),
        "model directory",
        "does not exist",
    )
    _one_line_error(xbt(*upgrade_args(tiny, tmp_path / "o"), "--set", "finetune.nope=1"), "unknown setting 'nope'")
    # a setting the named method never reads is warned about (and the unknown key still fails, before any work)
    r = xbt(*upgrade_args(tiny, tmp_path / "o"), "--method", "procrustes", "--set", "pretrain.epochs=3",
            "--set", "finetune.nope=1")  # fmt: skip
    assert r.returncode == 1 and "unknown setting 'nope'" in r.stderr.splitlines()[-1]
    assert "warning: --set pretrain.epochs: procrustes reads no pretrain settings (it has none); ignored" in r.stderr
    r = xbt(*upgrade_args(tiny, tmp_path / "o"), "--method", "xbt", "--set", "finetune.nope=1")
    assert "warning" not in r.stderr and "unknown setting 'nope'" in r.stderr
    for value, needle in (("-0.1", "greater than or equal to 0, got -0.1"), ("nan", "finite number, got nan")):
        _one_line_error(xbt(*upgrade_args(tiny, tmp_path / "o"), "--val-fraction", value), "--val-fraction: ", needle)


def test_a_missing_pairs_column_fails_before_the_flow_starts(tiny, tmp_path):
    # Input checks run before Prefect or any model starts: one line on stderr, no run log, nothing written.
    bad = tmp_path / "pairs.parquet"
    pq.write_table(pq.read_table(tiny["pairs"]).drop_columns(["caption"]), bad)
    out = tmp_path / "o"
    r = xbt(*upgrade_args({**tiny, "pairs": bad}, out), "--no-progress")
    _one_line_error(r, str(bad), "missing column 'caption'")
    assert r.stdout == ""  # no run log: nothing started
    assert not (out / "report.json").exists() and not (out / "bundle").exists()


def test_unwritable_outputs_fail_before_any_work(tiny, tmp_path):
    (tmp_path / "afile").write_text("x")
    _one_line_error(xbt(*upgrade_args(tiny, tmp_path / "afile")), "afile", "is a file, not a folder")
    _one_line_error(xbt(*upgrade_args(tiny, tmp_path / "afile" / "run")), "cannot be created", "is a file")
    _one_line_error(
        xbt("embed", "--model", tiny["new"], "--input", tiny["eval"], "--modality", "text", "--out", tmp_path),
        "is a folder",
    )
    _one_line_error(
        xbt(
            "embed",
            "--model",
            tiny["new"],
            "--input",
            tiny["eval"],
            "--modality",
            "text",
            "--out",
            tmp_path / "afile" / "e.parquet",
        ),
        "cannot be created",
    )


@pytest.mark.parametrize(
    "env, name",
    [
        ({"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}, "MLflow tracking server at http://127.0.0.1:9"),
        ({"PREFECT_API_URL": "http://127.0.0.1:9/api"}, "Prefect API at http://127.0.0.1:9/api/health"),
    ],
)
def test_unreachable_server_fails_in_seconds_naming_it(tiny, tmp_path, env, name):
    t0 = time.perf_counter()
    r = xbt(*upgrade_args(tiny, tmp_path / "o"), env=env)
    _one_line_error(r, name, "unreachable")
    assert time.perf_counter() - t0 < 60
    assert not (tmp_path / "o").exists()


def test_an_upgrade_into_a_folder_another_run_writes_is_refused_and_leaves_that_runs_files(tiny, tmp_path):
    from xbtcore.lock import exclusive

    out = tmp_path / "o"
    (out / "bundle").mkdir(parents=True)  # what a run at work has published before its report
    (out / "bundle" / "phi.safetensors").write_bytes(b"that run's head")
    with exclusive(out, "xbt upgrade", "wait"):  # that run
        r = xbt(*upgrade_args(tiny, out))
        # refused before the servers are checked and Prefect starts (they fail here: nothing answers on port 9)
        early = xbt(*upgrade_args(tiny, out), env={"PREFECT_API_URL": "http://127.0.0.1:9/api"})
    _one_line_error(r, f"{out}: xbt upgrade (pid {os.getpid()}) is writing there", "pass another --out")
    _one_line_error(early, f"{out}: xbt upgrade (pid {os.getpid()}) is writing there", "pass another --out")
    assert (out / "bundle" / "phi.safetensors").read_bytes() == b"that run's head"


def test_a_tracking_store_mlflow_cannot_open_fails_the_upgrade_before_any_work(tiny, tmp_path):
    uri = str(tmp_path / "mlruns")  # a plain folder: MLflow's file store, which it refuses to write
    r = xbt(*upgrade_args(tiny, tmp_path / "o"), env={"MLFLOW_TRACKING_URI": uri})
    _one_line_error(r, f"MLFLOW_TRACKING_URI={uri}: MLflow cannot open this store", "sqlite:///")
    assert not (tmp_path / "o").exists()


def test_registry_commands_fail_in_seconds_when_the_tracking_server_does_not_answer(tiny, tmp_path):
    env = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    for args in (
        ("promote",),
        ("rollback",),
        ("embed", "--model", "models:/xbt-any@champion", "--input", tiny["eval"], "--modality", "text", "--out",
         tmp_path / "e.parquet"),
    ):  # fmt: skip
        t0 = time.perf_counter()
        _one_line_error(xbt(*args, env=env), "MLflow tracking server at http://127.0.0.1:9", "unreachable")
        assert time.perf_counter() - t0 < 60, args


def test_embed_text_and_image_and_bundle(tiny, tmp_path):
    from xbtcore.bundle import BundleMeta, save_bundle
    from xbtcore.data import read_gallery, read_pairs
    from xbtcore.encoders import DualEncoder
    from xbtcore.phi import LinearMap

    new = DualEncoder.from_pretrained(tiny["new"])
    evalset = read_pairs(tiny["eval"])
    r = xbt(
        "embed", "--model", tiny["new"], "--input", tiny["eval"], "--modality", "text", "--out", tmp_path / "t.parquet"
    )
    assert r.returncode == 0, r.stderr
    assert "item/s" not in r.stderr  # stderr is no terminal here: no progress bar
    table = pq.read_table(tmp_path / "t.parquet")
    assert table.column("row").to_pylist() == list(range(len(evalset.captions)))
    _, emb = read_gallery(tmp_path / "t.parquet")
    torch.testing.assert_close(emb, new.embed_texts(evalset.captions), atol=1e-5, rtol=0)

    r = xbt(
        "embed",
        "--model",
        tiny["new"],
        "--input",
        tiny["eval"],
        "--modality",
        "image",
        "--out",
        tmp_path / "i.parquet",
    )
    assert r.returncode == 0, r.stderr
    _, emb = read_gallery(tmp_path / "i.parquet")
    assert emb.shape == (len(evalset.captions), 32)  # one embedding per input row
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(len(emb)))

    # A bundle embeds into the old space: φ(normalize(E_new(x))) with a fitted W here.
    weight = torch.linalg.qr(torch.randn(32, 24, generator=torch.Generator().manual_seed(0)))[0]  # (32, 24)
    save_bundle(
        tmp_path / "bundle",
        new,
        LinearMap.of(weight),
        BundleMeta(tiny["new"], tiny["old"], tiny["old"], "procrustes", {"in_dim": 32, "out_dim": 24}),
    )
    r = xbt(
        "embed",
        "--model",
        tmp_path / "bundle",
        "--input",
        tiny["eval"],
        "--modality",
        "text",
        "--out",
        tmp_path / "b.parquet",
    )
    assert r.returncode == 0, r.stderr
    _, emb = read_gallery(tmp_path / "b.parquet")
    expected = torch.nn.functional.normalize(new.embed_texts(evalset.captions) @ weight, dim=-1)
    torch.testing.assert_close(emb, expected, atol=1e-5, rtol=0)

    _one_line_error(
        xbt(
            "embed",
            "--model",
            tiny["new"],
            "--input",
            tiny["eval"],
            "--modality",
            "text",
            "--text-column",
            "nope",
            "--out",
            tmp_path / "x.parquet",
        ),
        "missing column 'nope'; the file has columns ['image', 'caption', 'image_id']: name the text column with "
        "--text-column NAME (its text columns: ['caption'])",
    )

    r = xbt("catalog", "--json", "--table", "galleries")
    assert r.returncode == 0
    galleries = json.loads(r.stdout)["galleries"]
    assert str(tmp_path / "b.parquet") in [g["path"] for g in galleries]


def test_embed_and_index_take_a_device_and_precision(tiny, tmp_path):
    from xbtcore.data import read_gallery

    args = ("--model", tiny["new"], "--input", tiny["eval"], "--modality", "text")
    for precision in ("fp32", "bf16"):
        r = xbt(
            "embed", *args, "--out", tmp_path / f"{precision}.parquet", "--device", "cpu", "--precision", precision
        )
        assert r.returncode == 0, r.stderr
    (_, full), (_, half) = (read_gallery(tmp_path / f"{p}.parquet") for p in ("fp32", "bf16"))
    cos = (full * half).sum(1)
    assert cos.min() > 0.999 and not torch.equal(full, half)  # bf16 ran, close to float32
    r = xbt("index", *args, "--out", tmp_path / "index", "--device", "cpu", "--precision", "bf16")
    assert r.returncode == 0, r.stderr
    # the suite hides any GPU (conftest.py)
    _one_line_error(xbt("embed", *args, "--out", tmp_path / "x.parquet", "--device", "cuda"), "sees no CUDA GPU")
    _one_line_error(xbt("index", *args, "--out", tmp_path / "i2", "--device", "cuda:1"), "sees no CUDA GPU")
    _one_line_error(xbt(*upgrade_args(tiny, tmp_path / "o"), "--device", "cuda"), "sees no CUDA GPU", "use cpu")
    _one_line_error(xbt(*upgrade_args(tiny, tmp_path / "o"), "--nproc", "0"), "nproc 0", "at least one process")
    _one_line_error(xbt(*upgrade_args(tiny, tmp_path / "o"), "--nproc", "two"), "nproc 'two' is not a number", "auto")
    assert not (tmp_path / "x.parquet").exists() and not (tmp_path / "o" / "report.json").exists()


def test_embed_compiled_gives_the_plain_embeddings(tiny, tmp_path):
    from xbtcore.data import read_gallery

    args = ("--model", tiny["new"], "--input", tiny["eval"], "--modality", "text", "--device", "cpu")
    for compile in ("on", "off"):
        r = xbt("embed", *args, "--out", tmp_path / f"{compile}.parquet", "--compile", compile)
        assert r.returncode == 0, r.stderr
        assert "torch.compile of" not in r.stderr  # it compiled, not fell back
    (ids, on), (ids_off, off) = (read_gallery(tmp_path / f"{c}.parquet") for c in ("on", "off"))
    assert ids == ids_off
    torch.testing.assert_close(on, off, atol=1e-5, rtol=0)
    _one_line_error(xbt("embed", *args, "--out", tmp_path / "x.parquet", "--compile", "yes"), "invalid choice: 'yes'")


def test_promote_and_rollback_commands(tmp_path, monkeypatch):
    from tasks import registry
    from tests.test_mlflow_registry import _register, _report

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("XBT_STATE_DIR", str(tmp_path / "state"))
    first = _register(tmp_path, "v1", passed=True)
    second = _register(tmp_path, "v2", passed=False)
    name, c = first["name"], registry.client()
    # The candidate failed its gate: refused without --force, naming the failing check; nothing moves.
    registry_uri = f"[registry sqlite:///{tmp_path / 'mlflow.db'}]"
    _one_line_error(
        xbt("promote"),
        "failed its gate (t2i R@1 new/old 9.0 <= old/old 10.0): it is not promoted",
        "--force",
        registry_uri,
    )
    assert registry.champion_version(c, name) == first["version"]
    r = xbt("promote", "--force", env={"USER": "reviewer-a"})  # the candidate, the only xbt model
    assert r.returncode == 0, r.stderr
    assert f"version {second['version']} is champion (was {first['version']})" in r.stdout
    assert "forced past a failing check: t2i R@1 new/old 9.0 <= old/old 10.0" in r.stdout
    assert c.get_model_version(name, second["version"]).tags["xbt.forced_by"].startswith("reviewer-a ")
    r = xbt("promote", "--version", second["version"], "--force")
    assert "(already)" in r.stdout
    r = xbt("rollback", "--model", name)
    assert r.returncode == 0 and f"to {first['version']}" in r.stdout
    _one_line_error(xbt("rollback"), "nothing to roll back to", registry_uri)
    _one_line_error(xbt("promote", "--model", "xbt-nope"))
    # an upgrade that stopped after registering (passed, so champion): its run has no report.json, which
    # promoting it back says
    path, bundle, verdict = _report(tmp_path, "v3", passed=True)
    report = json.loads(Path(path).read_text())
    third = registry.register_and_promote.fn(report, report["recall"], bundle, "/m/old", verdict, {}, [])
    xbt("rollback")
    r = xbt("promote", "--version", third["version"])
    assert r.returncode == 0 and f"version {third['version']}'s MLflow run has no report.json" in r.stdout


# A small XBT upgrade that checkpoints every 2 training steps, for the tests that stop it mid-training.
KILLABLE = [
    "--method",
    "xbt",
    "--set",
    "pretrain.epochs=2",
    "--set",
    "finetune.batch_size=8",
    "--set",
    "finetune.epochs=8",
    "--set",
    "finetune.checkpoint_every=2",
]


def _run_until_checkpoint(args, out, **popen):
    """Start `xbt ARGS` in a process group of its own and wait until training wrote a checkpoint (or the
    run ended, or 300 s); -> (the process, the checkpoints found)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *map(str, args)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
        **popen,
    )
    deadline = time.time() + 300
    while not (ckpts := list((out / "work").glob("bundle-*.ckpt"))) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    return proc, ckpts


@pytest.mark.slow
def test_upgrade_killed_mid_training_resumes_from_checkpoint(tiny, tmp_path):
    out = tmp_path / "run"
    args = upgrade_args(tiny, out) + KILLABLE
    proc, ckpts = _run_until_checkpoint(args, out, stderr=subprocess.DEVNULL)
    assert ckpts, "training never wrote a checkpoint"
    ckpt = ckpts[0]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "report.json").exists()

    # The checkpoint belongs to those settings: the same run folder with another lr trains from the start.
    import shutil

    other = tmp_path / "other-lr"
    shutil.copytree(out, other)
    r = xbt(*[other if str(a) == str(out) else a for a in args], "--set", "finetune.lr=3e-4")
    assert r.returncode == 0, r.stderr
    assert _train_history(other, exclude=ckpt.name)["resumed_from"] == 0

    r = xbt(*args)
    assert r.returncode == 0, r.stderr
    history = _train_history(out)
    assert history["resumed_from"] >= 2
    # The loss curve is whole: the steps before the kill come from the checkpoint, each step once.
    assert [s["step"] for s in history["steps"]] == list(range(1, len(history["steps"]) + 1))
    report = json.loads((out / "report.json").read_text())
    train_pairs = report["counts"]["pairs"] - report["counts"]["val_pairs"]  # validation pairs never train
    assert len(history["steps"]) == train_pairs // 8 * 8  # batch 8, 8 epochs
    assert report["steps"]["embed-frozen"] == "Cached" and report["steps"]["train"] == "Completed"
    assert "gate (Eqn. 2):" in r.stdout and "old/old" in r.stdout
    assert not ckpt.exists()


def _train_history(out: Path, exclude: str = "") -> dict:
    """The train step's loss history in a run folder (beside its bundle under work/), the only one there
    but for the training whose checkpoint is named `exclude`."""
    skip = exclude.removesuffix(".ckpt")
    (path,) = [p for p in (out / "work").glob("bundle-*.history.json") if not skip or not p.name.startswith(skip)]
    return json.loads(path.read_text())


def _processes_with(needle: str) -> list[str]:
    """Command lines of the running processes that contain `needle`."""
    found = []
    for proc in os.listdir("/proc"):
        try:
            cmd = open(f"/proc/{proc}/cmdline", "rb").read().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if needle in cmd:
            found.append(cmd)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, says", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_or_sigterm_to_the_process_group_ends_the_run_in_seconds(tiny, tmp_path, sig, code, says):
    """The signal reaches the terminal's whole process group. Prefect's private API server lives in a
    session of its own, so it outlives xbt long enough to record the crash, and xbt never retries a dead
    API; the run stops in seconds."""
    out = tmp_path / "run"
    proc, _ = _run_until_checkpoint(
        upgrade_args(tiny, out) + ["--no-progress", *KILLABLE],
        out,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # a terminal job's
    assert proc.poll() is None, "the run ended before training"
    assert _processes_with(f"--parent {proc.pid}"), "no private Prefect API is running"
    os.killpg(proc.pid, sig)
    t0 = time.time()
    _, err = proc.communicate(timeout=60)
    assert time.time() - t0 < 30
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1].startswith(f"xbt: error: {says}"), err
    assert not (out / "report.json").exists()
    deadline = time.time() + 10
    while _processes_with(f"--parent {proc.pid}") and time.time() < deadline:
        time.sleep(0.2)
    assert not _processes_with(f"--parent {proc.pid}"), "the private Prefect API outlived xbt"


def test_chain_result_lists_the_no_regression_failures_too(capsys):
    from flows.cli import _print_result
    from xbtcore.gate import eqn2_gate, no_regression_gate

    ks = ("1", "5", "10", "50")
    recall = {
        d: {
            "old/old": dict.fromkeys(ks, 40.0),
            "new/old": dict.fromkeys(ks, 45.0),
            "new/new": dict.fromkeys(ks, 50.0),
            "orig-new/new": dict.fromkeys(ks, 50.0),
            "prev/old": dict.fromkeys(ks, 46.0 if d == "i2t" else 44.0),
        }
        for d in ("t2i", "i2t")
    }
    report = {
        "recall": recall,
        "gate": eqn2_gate(recall).to_dict(),
        "no_regression": no_regression_gate(recall).to_dict(),
        "promotion": {"model": "xbt-x", "version": "2", "reason": "gate failed (3 failing checks): not promoted"},
        "bundle": "/tmp/run/bundle",
        "mlflow": {"tracking_uri": "sqlite:////tmp/run/mlflow.db"},
    }
    _print_result(report)
    out = capsys.readouterr().out
    assert "not promoted [registry sqlite:////tmp/run/mlflow.db]" in out  # the registry line names its store
    assert "gate (Eqn. 2): PASSED" in out and "no regression (new/old >= prev/old): FAILED" in out
    assert out.count("failing: i2t R@") == 3 and "new/old 45.0 < prev/old 46.0" in out


def test_a_state_folder_that_does_not_exist_yet_is_made(monkeypatch, tmp_path):
    from flows.cli import _set_env_defaults

    state = tmp_path / "not" / "yet"
    monkeypatch.setenv("XBT_STATE_DIR", str(state))
    for name in ("PREFECT_HOME", "DO_NOT_TRACK", "PREFECT_SERVER_ANALYTICS_ENABLED", "TOKENIZERS_PARALLELISM"):
        monkeypatch.setenv(name, "")  # recorded, so that the test's defaults are undone after it
        monkeypatch.delenv(name)
    _set_env_defaults()
    assert os.environ["PREFECT_HOME"] == str(state / "prefect")
    assert (state / "prefect").is_dir()


def test_sizes_below_one_are_refused_by_the_argument_parser_naming_the_flag():
    for args in (
        ["embed", "--model", "zoo/old", "--input", "x.parquet", "--modality", "text", "--out", "y.parquet"],
        ["index", "--model", "zoo/old", "--input", "x.parquet", "--modality", "text", "--out", "idx"],
    ):
        flag = "--batch-size" if args[0] == "embed" else "--chunk-rows"
        for bad in ("0", "-3", "2.5"):
            r = xbt(*args, flag, bad)
            assert r.returncode == 2 and f"argument {flag}: '{bad}' is not a whole number of at least 1" in r.stderr


def test_a_full_disk_is_one_line_naming_the_file_and_the_fix(tiny, tmp_path, monkeypatch, capsys):
    import errno
    import shutil

    import xbtcore.data
    from flows.cli import main

    texts = tmp_path / "texts.parquet"
    pq.write_table(pa.table({"caption": ["a red circle", "a blue square"]}), texts)
    out = tmp_path / "emb.parquet"

    def full(path, *a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(xbtcore.data, "write_embeddings_parquet", full)
    args = ["embed", "--model", tiny["old"], "--input", str(texts), "--modality", "text", "--out", str(out)]
    args.append("--no-progress")  # stderr holds the error line alone
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"xbt: error: no space left on the disk of {out}: free space there (or write to another disk) "
                   "and run the same command again; finished steps are kept"]  # fmt: skip

    def copy_full(path, *a, **kw):  # a folder copy reports each file's failure as text
        raise shutil.Error([("/src/model.safetensors", "/o/bundle.tmp/model.safetensors", "[Errno 28] No space")])

    monkeypatch.setattr(xbtcore.data, "write_embeddings_parquet", copy_full)
    assert main(args) == 1
    assert "no space left on the disk of /o/bundle.tmp/model.safetensors:" in capsys.readouterr().err


def test_an_experiment_whose_artifacts_sit_behind_an_mlflow_server_fails_an_upgrade_without_it_before_training(
    tiny, tmp_path
):
    """A store shared with a server that proxied artifacts (mlflow-artifacts:/) cannot take this run's bundle
    without that server: told at once, naming the experiment and the fix, not at registration after training."""
    from mlflow import MlflowClient

    from tasks.registry import space_of

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    name = f"xbt/{space_of(str(Path(tiny['old']).resolve()))}"
    MlflowClient(uri, uri).create_experiment(name, artifact_location="mlflow-artifacts:/1")
    out = tmp_path / "o"
    r = xbt(*upgrade_args(tiny, out), "--method", "procrustes", "--no-progress", env={"MLFLOW_TRACKING_URI": uri})
    _one_line_error(r, f"MLflow experiment {name} keeps its artifacts behind an MLflow server", "`make servers`")
    assert not list(out.glob("work/corpus-*"))  # before the corpus was extracted
