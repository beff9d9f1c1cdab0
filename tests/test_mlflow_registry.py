"""MLflow registration and promotion: candidate always, champion only on a passing gate, rollback, URIs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks import registry

KS = ("1", "5", "10", "50")


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("XBT_STATE_DIR", str(tmp_path / "state"))
    return tmp_path


def _report(tmp_path: Path, tag: str, passed: bool):
    """A bundle folder (unique content per tag), its report.json and the gate verdict."""
    bundle = tmp_path / tag / "bundle"
    bundle.mkdir(parents=True)
    (bundle / "xbt_bundle.json").write_text(json.dumps({"tag": tag}))
    (bundle / "phi.safetensors").write_bytes(tag.encode() * 10)
    recall = {
        d: {c: {k: 10.0 for k in KS} for c in ("old/old", "new/old", "new/new", "orig-new/new")}
        for d in ("t2i", "i2t")
    }
    failures = [] if passed else [["t2i", 1, 9.0, 10.0]]
    gate = {"passed": passed, "criterion": "eqn2", "ks": [1, 5, 10], "failures": failures}
    report = {
        "method": "xbt",
        "old": "/m/old",
        "new": f"/m/{tag}",
        "recall": recall,
        "gate": gate,
        "counts": {"corpus": 1, "pairs": 1, "eval_images": 1, "eval_captions": 1},
        "timings_s": {"extract": 0.1, "embed": 0.1, "pretrain": 0.1, "train": 0.1, "evaluate": 0.1},
    }
    path = tmp_path / tag / "report.json"
    path.write_text(json.dumps(report))
    verdict = {"eqn2": gate, "passed": passed}
    return str(path), str(bundle), verdict


def _register(tmp_path, tag, passed):
    path, bundle, verdict = _report(tmp_path, tag, passed)
    histories = {"train": [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]}
    report = json.loads(Path(path).read_text())
    reg = registry.register_and_promote.fn(report, report["recall"], bundle, "/m/old", verdict, histories, [])
    if reg["run_open"]:
        registry.attach_report.fn(reg["run_id"], [path])
    return reg


def test_champion_moves_on_pass_not_on_fail_and_rolls_back(mlflow_store, caplog):
    c = registry.client()
    caplog.set_level("INFO", logger="xbt")
    first = _register(mlflow_store, "v1", passed=True)
    name = first["name"]
    assert first["promoted"] and registry.champion_version(c, name) == first["version"]
    assert c.get_model_version(name, first["version"]).tags[registry.TAG_PREVIOUS] == "none"

    failed = _register(mlflow_store, "v2", passed=False)
    uri = registry.tracking_uri()
    assert [r.getMessage() for r in caplog.records if "version" in r.getMessage()] == [
        f"{name} version {first['version']} is champion (previous: none) [registry {uri}]",
        f"{name} version {failed['version']} is candidate only: the gate failed, champion stays "
        f"{first['version']} [registry {uri}]",
    ]
    assert not failed["promoted"]
    assert str(c.get_model_version_by_alias(name, "candidate").version) == failed["version"]
    assert registry.champion_version(c, name) == first["version"]  # did not move
    tags = c.get_model_version(name, failed["version"]).tags
    assert (
        tags["gate.passed"] == "false"
        and tags["xbt.not_promoted"] == "gate failed: t2i R@1 new/old 9.0 <= old/old 10.0"
    )
    assert json.loads(tags["gate.failures"]) == [["t2i", 1, 9.0, 10.0]]

    third = _register(mlflow_store, "v3", passed=True)
    assert registry.champion_version(c, name) == third["version"]
    assert c.get_model_version(name, third["version"]).tags[registry.TAG_PREVIOUS] == first["version"]

    again = registry.promote(c, name, third["version"], "test")  # idempotent
    assert not again["changed"] and registry.champion_version(c, name) == third["version"]

    back = registry.rollback(c, name)
    assert back == {"name": name, "version": first["version"], "rolled_back_from": third["version"]}
    assert registry.champion_version(c, name) == first["version"]
    with pytest.raises(ValueError, match="nothing to roll back to"):
        registry.rollback(c, name)


def test_promoting_back_and_forth_still_rolls_back_to_the_first_champion(mlflow_store):
    c = registry.client()
    v1 = _register(mlflow_store, "r1", passed=True)["version"]
    name = _register(mlflow_store, "r2", passed=False)["name"]
    v2 = c.get_model_version_by_alias(name, "candidate").version
    v3 = _register(mlflow_store, "r3", passed=False)["version"]
    for v in (v3, v2, v3):  # a reviewer changes their mind twice
        registry.promote(c, name, v, "review")
    seen = [registry.rollback(c, name)["version"]]
    while seen[-1] != v1 and len(seen) < 5:
        seen.append(registry.rollback(c, name)["version"])
    assert seen[-1] == v1 and len(seen) < 5, seen  # reached v1, no cycle between v2 and v3
    with pytest.raises(ValueError, match="nothing to roll back to"):
        registry.rollback(c, name)


def test_same_bundle_is_one_version_and_metrics_are_logged(mlflow_store):
    a = _register(mlflow_store, "same", passed=True)
    path, bundle, verdict = _report(mlflow_store / "again", "same", passed=True)
    report = json.loads(Path(path).read_text())
    b = registry.register_and_promote.fn(report, report["recall"], bundle, "/m/old", verdict, {}, [])
    assert a["version"] == b["version"] and a["new_run"] and not b["new_run"]
    # the same bundle judged on other eval data (another recall, another verdict) is a version of its own, so
    # neither run's report disagrees with the tags of the version it names
    worse = {**report["recall"], "t2i": {**report["recall"]["t2i"], "new/old": {k: 9.0 for k in KS}}}
    failed = {"eqn2": {**verdict["eqn2"], "passed": False, "failures": [["t2i", 1, 9.0, 10.0]]}, "passed": False}
    d = registry.register_and_promote.fn(report, worse, bundle, "/m/old", failed, {}, [])
    assert d["version"] != a["version"] and d["new_run"] and not d["promoted"]
    c = registry.client()
    assert c.get_model_version(a["name"], a["version"]).tags["gate.passed"] == "true"
    assert c.get_model_version(d["name"], d["version"]).tags["gate.passed"] == "false"
    run = c.get_run(a["run_id"])
    assert run.data.metrics["t2i.new_old.R1"] == 10.0
    assert [m.value for m in c.get_metric_history(a["run_id"], "train_loss")] == [2.0, 1.5]
    assert "report.json" in [f.path for f in c.list_artifacts(a["run_id"])]
    assert c.get_experiment(a["experiment"]).name == f"xbt/{registry.space_of('/m/old')}"


def test_models_uri_resolves_to_a_local_bundle(mlflow_store):
    first = _register(mlflow_store, "v1", passed=True)
    local = registry.resolve_ref(f"models:/{first['name']}@champion")
    assert json.loads((Path(local) / "xbt_bundle.json").read_text()) == {"tag": "v1"}
    assert registry.resolve_ref(f"models:/{first['name']}/{first['version']}") == local  # downloaded once
    with pytest.raises(ValueError, match="not found in the MLflow registry"):
        registry.resolve_ref(f"models:/{first['name']}@nope")
    assert registry.resolve_ref("/some/dir") == "/some/dir"
    # What gets recorded: the version the alias stood at, not the alias that moves on.
    assert (
        registry.pinned_ref(f"models:/{first['name']}@champion", local)
        == f"models:/{first['name']}/{first['version']}"
    )
    assert registry.pinned_ref("/some/dir", "/some/dir") == "/some/dir"


def test_the_cli_downloads_a_champion_without_a_progress_bar(mlflow_store):
    first = _register(mlflow_store, "v1", passed=True)
    uri = f"models:/{first['name']}@champion"
    script = (
        "import sys; from flows import cli; from tasks import registry; cli._set_env_defaults(); "
        "print(registry.resolve_ref(sys.argv[1]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"}
    done = subprocess.run([sys.executable, "-c", script, uri], capture_output=True, text=True, env=env, check=True)
    assert json.loads((Path(done.stdout.strip()) / "xbt_bundle.json").read_text()) == {"tag": "v1"}
    assert "Downloading artifacts" not in done.stderr, done.stderr


def test_same_name_and_version_in_two_registries_are_two_bundles(tmp_path, monkeypatch):
    # The embedded SQLite registry and a server each have "version 1" of a space: never serve one for the other.
    monkeypatch.setenv("XBT_STATE_DIR", str(tmp_path / "state"))
    got = {}
    for store in ("a", "b"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / store / 'mlflow.db'}")
        (tmp_path / store).mkdir()
        first = _register(tmp_path / store, f"from-{store}", passed=True)
        got[store] = registry.resolve_ref(f"models:/{first['name']}/{first['version']}")
    assert got["a"] != got["b"]
    assert [json.loads((Path(got[s]) / "xbt_bundle.json").read_text())["tag"] for s in "ab"] == ["from-a", "from-b"]


def test_a_registered_model_that_does_not_exist_is_named_with_those_that_do(mlflow_store):
    c = registry.client()
    name = _register(mlflow_store, "n1", passed=True)["name"]
    with pytest.raises(ValueError, match=rf"no registered model 'nosuch' at .*; its xbt models: {name}"):
        registry.pick_model(c, "nosuch")
    assert registry.pick_model(c, name) == registry.pick_model(c, None) == name


def test_promoting_a_missing_version_names_it(mlflow_store):
    c = registry.client()
    name = _register(mlflow_store, "p1", passed=True)["name"]
    with pytest.raises(ValueError, match=rf"{name} version 99 is not in the MLflow registry"):
        registry.promote(c, name, "99", "review")
    with pytest.raises(ValueError, match="xbt-nope version 1 is not in the MLflow registry"):
        registry.promote(c, "xbt-nope", "1", "review")


def test_who_forced_a_promotion_is_the_login_else_the_user_id(monkeypatch):
    import getpass

    monkeypatch.setattr(getpass, "getuser", lambda: "reviewer-b")
    assert registry._user() == "reviewer-b"

    def no_login():
        raise KeyError("getpwuid(): uid not found")  # a container's user with no passwd entry and no USER

    monkeypatch.setattr(getpass, "getuser", no_login)
    assert registry._user() == f"uid {os.getuid()}"


def _dead_pid() -> str:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return done.stdout.strip()


def test_a_run_left_open_by_a_killed_process_is_ended_or_given_its_report_by_the_next_registration(mlflow_store):
    c = registry.client()

    def register_unreported(tag):  # registered, then "killed" before attach_report: its run stays open
        path, bundle, verdict = _report(mlflow_store, tag, passed=True)
        report = json.loads(Path(path).read_text())
        reg = registry.register_and_promote.fn(report, report["recall"], bundle, "/m/old", verdict, {}, [])
        return reg, lambda: registry.register_and_promote.fn(
            report, report["recall"], bundle, "/m/old", verdict, {}, []
        )

    live, _ = register_unreported("live")  # this process: alive, so never taken for an orphan
    killed, rerun = register_unreported("killed")
    c.set_tag(killed["run_id"], registry.TAG_PID, _dead_pid())
    assert c.get_run(killed["run_id"]).info.status == "RUNNING"
    assert registry.orphaned_runs(c, killed["experiment"]) == [killed["run_id"]]

    # the rerun of the same command: the same bundle and verdict find their version, whose run gets the report
    again = rerun()
    assert again["version"] == killed["version"] and not again["new_run"] and again["run_open"]
    registry.attach_report.fn(again["run_id"], [str(mlflow_store / "killed" / "report.json")])
    assert c.get_run(killed["run_id"]).info.status == "FINISHED"
    assert "report.json" in [f.path for f in c.list_artifacts(killed["run_id"])]

    # another upgrade's registration ends an orphan of another bundle as KILLED, and leaves a live one open
    orphan, orphan_rerun = register_unreported("orphan")
    c.set_tag(orphan["run_id"], registry.TAG_PID, _dead_pid())
    other = _register(mlflow_store, "other", passed=False)
    assert c.get_run(orphan["run_id"]).info.status == "KILLED"
    assert c.get_run(other["run_id"]).info.status == "FINISHED"
    assert c.get_run(live["run_id"]).info.status == "RUNNING"
    assert registry.orphaned_runs(c, other["experiment"]) == []

    # the orphan's own rerun, after that: its version's run still gets the report, and the candidate alias stays
    # on the latest version registered
    again = orphan_rerun()
    assert again["version"] == orphan["version"] and again["run_open"]
    registry.attach_report.fn(again["run_id"], [str(mlflow_store / "orphan" / "report.json")])
    assert c.get_run(orphan["run_id"]).info.status == "FINISHED"
    assert registry.alias_version(c, other["name"], registry.CANDIDATE) == other["version"]
    assert not orphan_rerun()["run_open"]  # finished: nothing left to attach


def test_a_chain_links_no_regression_failures_are_named_against_prev_old(mlflow_store):
    path, bundle, _ = _report(mlflow_store, "link", passed=False)
    report = json.loads(Path(path).read_text())
    eqn2 = {"passed": True, "criterion": "eqn2", "ks": [1, 5, 10], "failures": []}
    regress = {"passed": False, "criterion": "no-regression", "ks": [1, 5, 10], "failures": [["t2i", 1, 52.7, 53.9]]}
    verdict = {"eqn2": eqn2, "no_regression": regress, "passed": False}
    reg = registry.register_and_promote.fn(report, report["recall"], bundle, "/m/old", verdict, {}, [])
    c = registry.client()
    tags = c.get_model_version(reg["name"], reg["version"]).tags
    assert json.loads(tags["gate.failures"]) == [] and tags["xbt.not_promoted"].endswith("52.7 < prev/old 53.9")
    with pytest.raises(registry.GateFailed, match=r"t2i R@1 new/old 52.7 < prev/old 53.9\): it is not promoted"):
        registry.promote_reviewed(c, reg["name"], reg["version"])
    forced = registry.promote_reviewed(c, reg["name"], reg["version"], force=True, who="reviewer")
    assert forced["failures"] == ["t2i R@1 new/old 52.7 < prev/old 53.9"]


def test_a_version_without_a_gate_verdict_needs_force_and_a_missing_report_is_named(mlflow_store):
    c = registry.client()
    passed = _register(mlflow_store, "judged", passed=True)
    name = passed["name"]
    # registered by hand beside xbt's versions: no gate tags
    by_hand = c.create_model_version(name, source=str(mlflow_store / "judged" / "bundle"), run_id=passed["run_id"])
    with pytest.raises(registry.GateFailed, match=rf"{name} version {by_hand.version} has no gate verdict"):
        registry.promote_reviewed(c, name, str(by_hand.version))
    assert registry.champion_version(c, name) == passed["version"]
    forced = registry.promote_reviewed(c, name, str(by_hand.version), force=True, who="reviewer")
    assert forced["failures"] == ["no gate verdict recorded"] and forced["changed"]
    tags = c.get_model_version(name, str(by_hand.version)).tags
    assert tags["xbt.forced_by"].startswith("reviewer ") and "a missing gate verdict" in tags["xbt.promoted"]

    # an upgrade that stopped after registering: its version has its verdict, its run no report
    path, bundle, verdict = _report(mlflow_store, "stopped", passed=True)
    report = json.loads(Path(path).read_text())
    stopped = registry.register_and_promote.fn(report, report["recall"], bundle, "/m/old", verdict, {}, [])
    assert c.get_model_version(name, stopped["version"]).tags["gate.passed"] == "true"
    registry.rollback(c, name)
    again = registry.promote_reviewed(c, name, stopped["version"])
    assert again["report_missing"] and again["failures"] == []
    assert not registry.promote_reviewed(c, name, passed["version"])["report_missing"]
