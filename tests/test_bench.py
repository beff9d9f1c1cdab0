"""The benchmark scripts at toy sizes: one JSON object each, both sides agreeing, and the doc rendered from it."""

import json
import subprocess
import sys

import pytest

from conftest import REPO


def bench(script: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, f"bench/{script}", *args], cwd=REPO, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, "a bench prints exactly one JSON object on stdout"
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return tmp_path_factory.mktemp("results")


def test_extract_bench_sides_agree(results):
    r = bench("extract_bench.py", "--rows", "20000", "--files", "4", "--repeats", "1")
    assert r["same_output"] and r["same_distinct_count"]
    # about 2% nulls and blanks and a fifth duplicates are dropped
    assert 0.5 * r["rows"] < r["distinct_rows"] < 0.95 * r["rows"]
    assert r["ours_peak_rss_mb"] > r["ours_rss_after_imports_mb"] > 0 and r["pandas_peak_rss_mb"] > 0
    # both times are rounded to the millisecond and the ratio to 0.01: at toy sizes (0.05 s) that is a few percent
    assert r["ratio"] == pytest.approx(r["pandas_s"] / r["ours_s"], rel=0.03, abs=0.011)
    assert r["machine"].startswith("cpu: ")
    (results / "extract.json").write_text(json.dumps(r))


def test_embed_bench_outputs_agree(results):
    r = bench("embed_bench.py", "--n", "256", "--batch-size", "64")
    assert r["outputs_agree"] and r["max_abs_diff"] < r["atol"]
    assert r["texts"] == 256 and r["ours_texts_per_s"] > 0 and r["naive_texts_per_s"] > 0
    (results / "embed.json").write_text(json.dumps(r))


def test_pretrain_bench_cache_matches_recompute(results):
    r = bench("pretrain_bench.py", "--n", "512", "--epochs", "1")
    assert r["outputs_agree"]
    assert r["epochs"] == 1 and r["texts"] == 512
    # the cached side skips both encoders, which is most of the recomputing side's work
    assert r["recompute_s"] > r["cached_s"] and r["cached_samples_per_s"] > r["recompute_samples_per_s"]
    (results / "pretrain.json").write_text(json.dumps(r))


def test_render_from_saved_results(results, tmp_path):
    (results / "quality.json").write_text(json.dumps({"device": "cpu", "runs": [{"method": "xbt", "seed": 0, "gate": True}]}))
    doc = tmp_path / "benchmarks.md"
    out = subprocess.run([sys.executable, "bench/run_all.py", "--render-only", "--results", str(results),
                          "--doc", str(doc)], cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    text = doc.read_text()
    for item in ("3a extraction throughput", "3a/4 extraction peak memory", "3b text embedding throughput",
                 "3d φ pretraining samples/s", "### quality", "made by `python bench/quality.py", "| xbt | 0 | True |"):
        assert item in text
    # a toy-sized extraction cannot meet the goal stated at 10 million rows
    assert "run at 20,000 rows, not the goal's 10,000,000" in text
    assert "`recall` (`bench/run_all.py --only recall`)" in text


def test_quality_runs_render_as_table_with_failing_checks():
    sys.path.insert(0, str(REPO))
    from bench.run_all import render_paper_table

    case = {k: 1.0 for k in ("1", "5", "10")}
    recall = {d: {c: dict(case) for c in ("old/old", "new/old", "new/new", "orig-new/new")} for d in ("t2i", "i2t")}
    recall["t2i"]["new/old"]["5"] = 0.5
    run = {"method": "xbt", "seed": 2, "recall": recall,
           "gate": {"passed": False, "failures": [["t2i", 5, 0.5, 1.0]]}}
    text = render_paper_table("quality-x", {"note": "a note", "runs": [run]})
    assert "a note" in text
    assert "| xbt | 2 | 1.00 / 0.50 / 1.00 | 1.00 / 1.00 / 1.00 | 1.0 / 1.0 | failed | t2i R@5 0.5 vs 1.0 | n/a |" in text
    margin = {"margin": 0.3, "low": -0.1, "high": 0.7, "p_better": 0.8}
    run["gate_margins"] = {d: {k: dict(margin) for k in ("1", "5", "10")} for d in ("t2i", "i2t")}
    run["gate_margins"]["i2t"]["10"] = {"margin": -0.5, "low": -1.25, "high": 0.25, "p_better": 0.1}
    text = render_paper_table("quality-x", {"runs": [run]})
    assert "| t2i R@5 0.5 vs 1.0 | i2t R@10 -0.50 [-1.25, +0.25] |" in text
    assert render_paper_table("quality", {"runs": [{"method": "xbt", "seed": 0, "gate": True}]}) is None  # no recall: generic
