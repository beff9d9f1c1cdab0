"""MLflow: one experiment and one registered model per gallery space, aliases for promotion.

The gallery space is the root old model (the model the gallery was embedded
with). Every upgrade of that space is a version of its registered model:

    candidate   the latest version registered
    champion    the version serving queries; moves only when the gate passes
                (or a reviewer runs `xbt promote`), idempotently

Each version carries the gate's thresholds and verdict as tags, and on its
first promotion the version it replaced (`xbt.previous_champion`): `xbt
rollback` moves champion back to it. Promoting a version again keeps that tag,
so rollbacks always reach older champions and can never cycle between two
versions a reviewer promoted back and forth.

An upgrade's MLflow run stays open from registration until its report is
attached. Each run names the host and process that logged it, so a run whose
process died in between (a kill) is ended as KILLED by the next registration in
its experiment on that host, or, when that registration is the same bundle and
verdict, given its report and finished.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

from prefect import task

from xbtcore.bundle import BUNDLE_FILE
from xbtcore.cache import fingerprint_model
from xbtcore.gate import describe_failures, describe_verdict

from .common import IO_RETRIES, digest, fingerprint_content, log, state_dir
from .servers import ServerUnreachable, artifact_root, check_tracking_server, tracking_uri

CANDIDATE, CHAMPION = "candidate", "champion"
TAG_PREVIOUS = "xbt.previous_champion"
TAG_HOST, TAG_PID = "xbt.host", "xbt.pid"  # the process that logged a run and ends it (attach_report)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def orphaned_runs(c, exp_id: str) -> list[str]:
    """The experiment's open runs logged on this host by a process that is gone (killed between registering and
    attaching its report). A live process's run, another host's, or one logged without an owner is not one."""
    host = socket.gethostname().replace("'", "")
    runs = c.search_runs(
        [exp_id], filter_string=f"attributes.status = 'RUNNING' and tags.`{TAG_HOST}` = '{host}'", max_results=1000
    )
    return [
        r.info.run_id for r in runs if r.data.tags.get(TAG_PID, "").isdigit() and not _alive(int(r.data.tags[TAG_PID]))
    ]


def client():
    """An MlflowClient of the configured registry; a tracking server that does not answer fails here, in
    seconds (tasks.servers.check_tracking_server), not after MLflow's minutes of retries."""
    import mlflow
    from mlflow import MlflowClient

    check_tracking_server()
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(uri, uri)


def space_of(root_ref: str) -> str:
    """A readable, stable id of a gallery space: the root model's name (a local folder's own) and fingerprint."""
    local = Path(root_ref).expanduser()
    shown = local.resolve().name if local.is_dir() else Path(str(root_ref).rstrip("/")).name
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", shown or str(root_ref)).strip("-")
    return f"{name}-{fingerprint_model(root_ref)[:8]}"


def model_name(space: str) -> str:
    return f"xbt-{space}"


def check_artifact_store(root_ref: str) -> None:
    """Before any training: ServerUnreachable where this gallery space's experiment keeps its artifacts behind an
    MLflow server's proxy (mlflow-artifacts:/, from a server started with one) and MLFLOW_TRACKING_URI names a
    store without it, which cannot write there: the registration after training would fail."""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        return
    exp = client().get_experiment_by_name(f"xbt/{space_of(root_ref)}")
    if exp is not None and exp.artifact_location.startswith("mlflow-artifacts:"):
        raise ServerUnreachable(
            f"MLflow experiment {exp.name} keeps its artifacts behind an MLflow server ({exp.artifact_location}), "
            f"which MLFLOW_TRACKING_URI={uri} cannot write: run with that server (`make servers`, then the line "
            "it prints)"
        )


def _experiment_id(c, space: str) -> str:
    name = f"xbt/{space}"
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = artifact_root()
    return c.create_experiment(name, artifact_location=str(root / space) if root else None)


def _flat(prefix: str, d: dict) -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flat(key, v) if isinstance(v, dict) else {key: v})
    return out


def _metric_key(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_./ -]", "_", text)


def alias_version(c, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(c.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def champion_version(c, name: str) -> str | None:
    return alias_version(c, name, CHAMPION)


def failing_checks(tags: dict) -> list[str]:
    """A version's failing gate checks, a line each, each naming the case it fell short of (old/old for Eqn. 2,
    prev/old for a chain link's no-regression check), from its gate tags."""
    return describe_failures(json.loads(tags.get("gate.failures", "[]"))) + describe_failures(
        json.loads(tags.get("gate.no_regression_failures", "[]")), "no-regression"
    )


def promote(c, name: str, version: str, reason: str) -> dict:
    """Move champion to `version`; on its first promotion records the champion it replaces. Idempotent."""
    from mlflow.exceptions import MlflowException

    version = str(version)
    current = champion_version(c, name)
    try:
        tags = c.get_model_version(name, version).tags
    except MlflowException as e:
        raise ValueError(
            f"{name} version {version} is not in the MLflow registry at {tracking_uri()} "
            f"({str(e).splitlines()[0]}); list the versions with `xbt catalog`"
        ) from e
    if current == version:
        return {"name": name, "version": version, "previous": tags.get(TAG_PREVIOUS), "changed": False}
    if TAG_PREVIOUS not in tags:
        # Only the first time: a re-promotion that recorded the champion it replaces now would let
        # rollback step forward to a later version, and two such versions roll back to each other.
        c.set_model_version_tag(name, version, TAG_PREVIOUS, current or "none")
    c.set_model_version_tag(name, version, "xbt.promoted", f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {reason}")
    c.set_registered_model_alias(name, CHAMPION, version)
    return {"name": name, "version": version, "previous": current, "changed": True}


class GateFailed(ValueError):
    """A version whose gate failed was asked to become champion without --force."""


def promote_reviewed(c, name: str, version: str, force: bool = False, who: str = "") -> dict:
    """`xbt promote`: move champion to a version a person chose. A version whose gate failed, or that has no
    gate verdict (registered by hand), is refused (GateFailed names why) unless `force`, which is then recorded
    on the version (`xbt.forced_by`, who and when). -> promote's result, "failures" (a line per failing check
    forced past) and "report_missing" (its run never got its report.json)."""
    from mlflow.exceptions import MlflowException

    try:
        mv = c.get_model_version(name, str(version))
    except MlflowException as e:
        raise ValueError(
            f"{name} version {version} is not in the MLflow registry at {tracking_uri()} "
            f"({str(e).splitlines()[0]}); list the versions with `xbt catalog`"
        ) from e
    tags = mv.tags
    verdict = tags.get("gate.passed")
    if verdict is None:  # registered by hand, not by xbt upgrade: nothing says it beats the old model
        failures, why = ["no gate verdict recorded"], "has no gate verdict (xbt upgrade did not register it)"
    else:
        failures = (failing_checks(tags) or ["the gate failed"]) if verdict == "false" else []
        why = f"failed its gate ({'; '.join(failures)})"
    if failures and not force:
        raise GateFailed(
            f"{name} version {version} {why}: it is not promoted; pass --force to promote it anyway "
            "(recorded on the version)"
        )
    reason = "promoted by a reviewer (xbt promote)"
    if failures:
        who = who or _user()
        c.set_model_version_tag(name, str(version), "xbt.forced_by", f"{who} {time.strftime('%Y-%m-%dT%H:%M:%S')}")
        gate = "a failed gate" if verdict == "false" else "a missing gate verdict"
        reason = f"forced past {gate} by {who} (xbt promote --force)"
    return {
        **promote(c, name, str(version), reason),
        "failures": failures,
        # its upgrade stopped after registering it and before attaching report.json to its run
        "report_missing": bool(mv.run_id) and c.get_run(mv.run_id).info.status != "FINISHED",
    }


def rollback(c, name: str) -> dict:
    """Move champion back to the version it replaced (the champion's `xbt.previous_champion`)."""
    current = champion_version(c, name)
    if current is None:
        raise ValueError(f"registered model {name!r} has no champion to roll back")
    previous = c.get_model_version(name, current).tags.get(TAG_PREVIOUS, "none")
    if previous == "none":
        raise ValueError(f"{name} version {current} replaced no earlier champion: nothing to roll back to")
    c.set_model_version_tag(name, current, "xbt.rolled_back", time.strftime("%Y-%m-%dT%H:%M:%S"))
    c.set_registered_model_alias(name, CHAMPION, previous)
    return {"name": name, "version": previous, "rolled_back_from": current}


def xbt_model_names(c) -> list[str]:
    return sorted(m.name for m in c.search_registered_models() if m.name.startswith("xbt-"))


def pick_model(c, name: str | None) -> str:
    """The named registered model, or the only xbt one there is."""
    if name and c.search_registered_models(f"name = '{name}'"):
        return name
    names = xbt_model_names(c)
    if name:
        raise ValueError(
            f"no registered model {name!r} at {tracking_uri()}; its xbt models: {', '.join(names) or 'none'}"
        )
    if len(names) != 1:
        raise ValueError(f"name the registered model with --model (found {names or 'none'} at {tracking_uri()})")
    return names[0]


def resolve_ref(ref: str) -> str:
    """A `models:/NAME@ALIAS` or `models:/NAME/VERSION` URI -> a local bundle directory
    (downloaded once per version under the state folder); anything else unchanged."""
    if not str(ref).startswith("models:/"):
        return ref
    from mlflow.exceptions import MlflowException

    m = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))", ref)
    if not m:
        raise ValueError(f"{ref}: use models:/NAME@ALIAS or models:/NAME/VERSION")
    name, alias, number = m.groups()
    c = client()
    try:
        version = str(
            c.get_model_version_by_alias(name, alias).version if alias else c.get_model_version(name, number).version
        )
    except MlflowException as e:
        raise ValueError(
            f"{ref}: not found in the MLflow registry at {tracking_uri()} "
            f"({str(e).splitlines()[0]}); list versions with `xbt catalog`"
        ) from e
    # Keyed by registry too: two registries (the embedded SQLite one, a server) each have a version 1 of a name.
    dst = state_dir() / "models" / digest(tracking_uri())[:8] / name / f"v{version}"
    if not (dst / BUNDLE_FILE).is_file():
        import mlflow

        tmp = dst.with_name(dst.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(tmp))
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(tmp, dst)
    return str(dst)


def _user() -> str:
    """Who runs this process: the login name, else the user id (a container's root often has no USER)."""
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def pinned_ref(ref: str, resolved: str) -> str:
    """What to record for a model: an alias URI (models:/NAME@champion) becomes the version it
    resolved to (models:/NAME/3), since the alias moves on; anything else as given."""
    if not str(ref).startswith("models:/"):
        return ref
    path = Path(resolved)  # resolve_ref's .../models/REGISTRY/NAME/vN
    return f"models:/{path.parent.name}/{path.name.removeprefix('v')}"


resolve_model = task(name="resolve-model", **IO_RETRIES)(resolve_ref)


def _log_run(c, exp_id: str, run: dict, recall: dict, bundle_dir: str, histories: dict, figures: list[str]) -> str:
    """An MLflow run with the upgrade's settings, recall, timings, loss curves, figures and bundle; left
    open for `attach_report`."""
    from mlflow.entities import Metric, Param

    owner = {TAG_HOST: socket.gethostname(), TAG_PID: str(os.getpid())}
    mrun = c.create_run(
        exp_id,
        tags={"xbt.method": run["method"], "xbt.new": run["new"], "xbt.old": run["old"], **owner},
        run_name=f"{run['method']}:{Path(run['new']).name}",
    )
    rid = mrun.info.run_id
    now = int(time.time() * 1000)
    params = {
        "method": run["method"],
        "old": run["old"],
        "new": run["new"],
        **_flat("counts", run["counts"]),
        **_flat("config", run.get("config", {})),
    }
    metrics = [
        Metric(_metric_key(f"{d}.{case.replace('/', '_')}.R{k}"), float(v), now, 0)
        for d, cases in recall.items()
        for case, rs in cases.items()
        for k, v in rs.items()
    ]
    metrics += [Metric(f"time_s.{k}", float(v), now, 0) for k, v in run["timings_s"].items()]
    for name, steps in histories.items():
        metrics += [Metric(f"{name}_loss", float(s["loss"]), now, int(s["step"])) for s in steps]
    param_list = [Param(k, str(v)[:500]) for k, v in params.items()]
    for i in range(0, max(len(metrics), len(param_list)), 900):  # log_batch takes at most 1000 metrics
        c.log_batch(rid, metrics=metrics[i : i + 900], params=param_list[i : i + 90])
    for f in figures:
        c.log_artifact(rid, f, "figures")
    c.log_artifacts(rid, bundle_dir, "bundle")
    return rid


@task(name="register-and-promote")
def register_and_promote(
    run: dict, recall: dict, bundle_dir: str, root_ref: str, verdict: dict, histories: dict, figures: list[str]
) -> dict:
    """Log the run, register the bundle as a version (alias candidate) and, if the gate
    passed, move champion to it. The same bundle with the same recall and verdict is one version.
    -> name, version, experiment, run_id, new_run (a run was logged now), run_open (its run awaits
    `attach_report`: logged now, or by a process killed before it attached its report), promoted, champion, uri."""
    logger = log()
    c = client()
    space = space_of(root_ref)
    name = model_name(space)
    exp_id = _experiment_id(c, space)
    if not c.search_registered_models(f"name = '{name}'"):
        c.create_registered_model(
            name,
            tags={"xbt.space": space, "xbt.root_model": root_ref},
            description=f"Compatible query encoders for the gallery embedded with {root_ref}",
        )
    sha = fingerprint_content(bundle_dir)
    passed = bool(verdict["passed"])
    # gate.failures: Eqn. 2's [direction, K, new/old, old/old]; a chain link's no-regression checks apart, as
    # report.json keeps them
    gate_tags = {"gate.passed": str(passed).lower(), "gate.failures": json.dumps(verdict["eqn2"]["failures"])}
    if "no_regression" in verdict:
        gate_tags["gate.no_regression_failures"] = json.dumps(verdict["no_regression"]["failures"])
    # one version per bundle and verdict: a rerun finds its version, while the same bundle judged on other eval
    # data is another version, so that no version's gate tags are overwritten by a verdict its report does not give
    key = digest(sha, recall, verdict)
    found = c.search_model_versions(f"name = '{name}' and tags.`xbt.version_key` = '{key}'")
    orphans = orphaned_runs(c, exp_id)
    # this bundle's run, whose process was killed before it attached the report: left open, or already ended
    # as KILLED by another upgrade's registration
    reclaimed = bool(found) and (
        found[0].run_id in orphans or c.get_run(found[0].run_id).info.status in ("KILLED", "FAILED")
    )
    for rid in orphans:
        if not (reclaimed and rid == found[0].run_id):
            c.set_terminated(rid, "KILLED")
            logger.info("MLflow run %s was left open by a process that is gone: ended as KILLED", rid)
    if found:
        mv = found[0]
        logger.info("bundle %s is already %s version %s", sha, name, mv.version)
        for tag, value in gate_tags.items():  # its key holds the verdict: the same values, or ones it lacks
            c.set_model_version_tag(name, str(mv.version), tag, value)
    else:
        rid = _log_run(c, exp_id, run, recall, bundle_dir, histories, figures)
        tags = {
            "xbt.version_key": key,
            "xbt.bundle_sha": sha,
            "xbt.method": run["method"],
            "xbt.new": run["new"],
            "xbt.old": run["old"],
            "gate.criteria": ",".join(v["criterion"] for k, v in verdict.items() if k != "passed"),
            "gate.ks": json.dumps(verdict["eqn2"]["ks"]),
            "gate.rule": "eqn2: new/old > old/old; no-regression (chains): new/old >= prev/old; every K, t2i and i2t",
            **gate_tags,
        }
        # the verdict comes with the version: a process killed here leaves no version without one
        mv = c.create_model_version(name, source=f"{c.get_run(rid).info.artifact_uri}/bundle", run_id=rid, tags=tags)
    version = str(mv.version)
    candidate = alias_version(c, name, CANDIDATE)
    if not found or candidate is None or int(version) >= int(candidate):  # a rerun of an older version: stays
        c.set_registered_model_alias(name, CANDIDATE, version)
    if passed:
        result = promote(c, name, version, "gate passed")
        logger.info(
            "%s version %s is champion (previous: %s) [registry %s]",
            name,
            version,
            result["previous"] or "none",
            tracking_uri(),
        )
    else:
        c.set_model_version_tag(
            name,
            version,
            "xbt.not_promoted",
            "gate failed: " + "; ".join(describe_verdict(verdict)),
        )
        logger.info(
            "%s version %s is candidate only: the gate failed, champion stays %s [registry %s]",
            name,
            version,
            champion_version(c, name) or "unset",
            tracking_uri(),
        )
    return {
        "name": name,
        "version": version,
        "experiment": exp_id,
        "run_id": mv.run_id,
        "new_run": not found,
        "run_open": not found or reclaimed,
        "promoted": passed,
        "champion": champion_version(c, name),
        "uri": f"models:/{name}/{version}",
        "tracking_uri": tracking_uri(),
    }


@task(name="attach-report", **IO_RETRIES)
def attach_report(run_id: str, paths: list[str]) -> None:
    """The finished report.json and report.html as artifacts of the MLflow run, which ends here."""
    c = client()
    for path in paths:
        c.log_artifact(run_id, path)
    c.set_terminated(run_id)
