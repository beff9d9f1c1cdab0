"""The run's outputs for people: report.json, loss and recall figures, Prefect artifacts, catalog rows."""

from __future__ import annotations

import json
import os
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from safetensors.torch import load_file

from catalog import Catalog
from xbtcore.data import read_pairs
from xbtcore.evaluate import format_table
from xbtcore.margins import format_margins

from .common import IO_RETRIES, state_dir
from .html_report import examples_of, map_panels, render_report


def read_histories(paths: dict[str, str | None]) -> dict:
    """{stage: loss history} of the steps that wrote one (tasks.train.history_path); each entry's "steps"."""
    from .train import history_path

    out = {}
    for stage, path in paths.items():
        if path and history_path(path).exists():
            out[stage] = json.loads(history_path(path).read_text())["steps"]
    return out


def catalog() -> Catalog:
    return Catalog(state_dir() / "catalog.duckdb")


def _write_atomic(path: str, text: str) -> str:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    return str(out)


@task(name="build-report")
def build_report(
    run: dict,
    recall: dict,
    verdict: dict,
    margins: dict,
    promotion: dict,
    advice: list[str],
    candidates: list[dict],
    chosen: dict,
    backfill: dict | None = None,
) -> dict:
    """report.json's content: CONTRACT.md's keys, then the gate margins, the candidates and the choice among
    them, the promotion, what a progressive backfill would give on the way, and what to try next.

    run: method, old, new, resolved, counts, timings_s, config, bundle, space, steps, mlflow, old_image_tower,
    eval_images_tied (the flow's record of the run).
    """
    report = {
        "method": run["method"],
        "old": run["old"],
        "new": run["new"],
        "recall": recall,
        "gate": verdict["eqn2"],
        "counts": run["counts"],
        "timings_s": run["timings_s"],
    }
    if "no_regression" in verdict:
        report["no_regression"] = verdict["no_regression"]
    report["gate_margins"] = margins
    report["candidates"] = candidates
    report["chosen"] = chosen
    report.update(
        {
            k: run[k]
            for k in (
                "resolved",
                "old_image_tower",
                "eval_images_tied",
                "config",
                "bundle",
                "space",
                "steps",
                "mlflow",
            )
        }
    )
    report["promotion"] = promotion
    if backfill is not None:
        report["backfill"] = backfill
    report["next_steps"] = advice
    return report


@task(name="write-report")
def write_report(report: dict, eval_path: str, sample_path: str | None, out_dir: str) -> dict:
    """OUT/report.json and OUT/report.html, each atomic (one that exists is a finished one); -> their paths.
    The HTML is for people (tasks/html_report.py): the recall sections, and with the evaluate step's
    embedding sample the map and the retrieval examples."""
    panels = examples = n_points = None
    if sample_path and Path(sample_path).exists():
        sample = load_file(sample_path)
        evalset = read_pairs(eval_path)
        panels, n_points = map_panels(sample), len(sample["map_images"])
        examples = examples_of(sample, evalset.captions, evalset.image_ids, evalset.load_image)
    out = Path(out_dir)
    return {
        "json": _write_atomic(str(out / "report.json"), json.dumps(report, indent=2)),
        "html": _write_atomic(str(out / "report.html"), render_report(report, panels, examples, n_points)),
    }


@task(name="draw-figures")
def draw_figures(histories: dict, recall: dict, out_dir: str) -> list[str]:
    """Loss curves of pretraining and training, and the recall of each case at each K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    curves = {k: v for k, v in histories.items() if v}
    if curves:
        fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False)
        for ax, (name, steps) in zip(axes[0], curves.items()):
            ax.plot([s["step"] for s in steps], [s["loss"] for s in steps])
            ax.set(title=f"{name} loss", xlabel="step", ylabel="loss")
        fig.tight_layout()
        fig.savefig(out / "loss.png", dpi=100)
        plt.close(fig)
        paths.append(str(out / "loss.png"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, direction in zip(axes, ("t2i", "i2t")):
        for case, rs in recall[direction].items():
            ax.plot([int(k) for k in rs], list(rs.values()), marker="o", label=case)
        ax.set(title=f"{direction} recall@K", xscale="log", xlabel="K", ylabel="recall %")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "recall.png", dpi=100)
    plt.close(fig)
    paths.append(str(out / "recall.png"))
    return paths


def format_candidates(candidates: list[dict], chosen: dict) -> str:
    """The candidates an upgrade ran and the choice among them, a line each (CLI and markdown report)."""
    if len(candidates) < 2 and chosen.get("reason") == "--method":
        return f"method: {chosen['method']} (--method)"
    lines = [
        f"method chosen: {chosen['method']} ({chosen['reason']})",
        "candidates, on the validation pairs (new/old - old/old R@1 in points, "
        "the smallest margin of the gate's checks):",
    ]
    width = max(len(c["method"]) for c in candidates)
    for c in candidates:
        head = f"  {c['method']:<{width}} cost {c['cost']}"
        if not c["ran"]:
            lines.append(f"{head}  not run: {c['why']}")
            continue
        m = c["margins"]
        score = (
            (
                f"t2i {m['t2i']['1']['margin']:+.2f}  i2t {m['i2t']['1']['margin']:+.2f}  smallest "
                f"{min(m[d][k]['margin'] for d in ('t2i', 'i2t') for k in ('1', '5', '10')):+.2f}"
            )
            if m
            else "no validation"
        )
        note = "" if c["eligible"] else "  (not eligible: its queries run the old encoder; --allow-old-encoder)"
        lines.append(f"{head}  {c['seconds']:7.1f} s  {score}{note}")
    return "\n".join(lines)


def gate_rows(recall: dict, verdict: dict) -> list[dict]:
    rows = []
    for name, result in verdict.items():
        if name == "passed":
            continue
        reference = "old/old" if result["criterion"] == "eqn2" else "prev/old"
        failed = {(d, k) for d, k, *_ in result["failures"]}
        for d in ("t2i", "i2t"):
            for k in result["ks"]:
                rows.append(
                    {
                        "criterion": result["criterion"],
                        "direction": d,
                        "K": k,
                        "new/old": recall[d]["new/old"][str(k)],
                        reference: recall[d][reference][str(k)],
                        "passes": (d, k) not in failed,
                    }
                )
    return rows


@task(name="publish-artifacts")
def publish_artifacts(report: dict, verdict: dict, html_path: str | None = None) -> None:
    """The gate as a table artifact and a short markdown report on the flow run, linking report.html."""
    create_table_artifact(
        gate_rows(report["recall"], verdict),
        key="xbt-gate",
        description=f"Eqn. 2 gate: {'passed' if verdict['passed'] else 'failed'}",
    )
    promo = report["promotion"]
    html_link = (
        [
            (
                f"- full report (recall bars, embedding map, retrieval examples): [{html_path}]"
                f"({Path(html_path).as_uri()}), also in the MLflow run's artifacts"
            )
        ]
        if html_path
        else []
    )
    md = "\n".join(
        [
            f"# xbt upgrade: {report['method']}",
            f"- old: `{report['old']}`  new: `{report['new']}`",
            f"- gate: **{'passed' if verdict['passed'] else 'failed'}**",
            f"- MLflow: `{promo.get('model')}` version {promo.get('version')}: "
            f"{'champion' if promo.get('promoted') else 'candidate only'} ({promo.get('reason')})",
            f"- timings (s): {report['timings_s']}",
            *html_link,
            *(
                ["- next steps:", *(f"  - {line}" for line in report["next_steps"])]
                if report.get("next_steps")
                else []
            ),
            "",
            "```",
            format_table(report["recall"]),
            "",
            *([format_margins(report["gate_margins"])] if "gate_margins" in report else []),
            "```",
        ]
    )
    create_markdown_artifact(md, key="xbt-report", description="XBT upgrade report")


@task(name="record-datasets", **IO_RETRIES)
def record_datasets(datasets: list[dict]) -> None:
    cat = catalog()
    for d in datasets:
        cat.record_dataset(d["path"], d["kind"], d["fingerprint"], d["rows"])


@task(name="finish-run", **IO_RETRIES)
def finish_run(run_id: str) -> None:
    catalog().finish_run(run_id)


@task(name="record-run", **IO_RETRIES)
def record_run(run: dict, space: str, root_model: str, dim: int | None) -> None:
    cat = catalog()
    cat.record_space(space, root_model, dim, run["mlflow_model"])
    cat.record_run(run)
    cat.record_lineage(
        space, run["old"], run["new"], run["bundle"], run["mlflow_model"], run["mlflow_version"], run["run_id"]
    )
