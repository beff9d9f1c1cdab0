"""The throughput benches at toy sizes: one JSON object each, both sides agreeing; the doc rendered from results."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO))

from bench import run_all  # noqa: E402


def bench(script: str, *args: str) -> dict:
    out = subprocess.run(
        [sys.executable, f"bench/{script}", *args], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, "a bench prints exactly one JSON object on stdout"
    return json.loads(lines[0])


def saved(result: dict, name: str, results) -> dict:
    """A result as run_all saves it: with the run's command and context."""
    result = {
        "machine": "cpu: test",
        **result,
        "run": {
            "command": f"python bench/{name}.py",
            "seconds": 1.0,
            "date": "2026-01-01T00:00:00+00:00",
            "commit": "abc",
            "memory_gb": 1.0,
            "loadavg_1m": [0.1, 0.2],
        },
    }
    (results / f"{name}.json").write_text(json.dumps(result))
    return result


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
    saved(r, "extract", results)


def test_embed_bench_outputs_agree(results):
    r = bench("embed_bench.py", "--n", "256", "--batch-size", "64")
    assert r["outputs_agree"] and r["max_abs_diff"] < r["atol"]
    assert r["texts"] == 256 and r["ours_texts_per_s"] > 0 and r["naive_texts_per_s"] > 0
    saved(r, "embed", results)


def test_pretrain_bench_cache_matches_recompute(results):
    r = bench("pretrain_bench.py", "--n", "512", "--epochs", "1")
    assert r["outputs_agree"]
    assert r["epochs"] == 1 and r["texts"] == 512
    # the cached side skips both encoders, which is most of the recomputing side's work
    assert r["recompute_s"] > r["cached_s"] and r["cached_samples_per_s"] > r["recompute_samples_per_s"]
    saved(r, "pretrain", results)


def test_recall_bench_times_the_recall_of_its_data_by_brute_force(results):
    from bench.recall_bench import synthetic
    from xbtcore.recall import recall_at_k_reference

    r = bench("recall_bench.py", "--images", "400", "--captions-per-image", "2", "--dim", "16", "--chunk-size", "128")
    assert (r["images"], r["captions"], r["dim"]) == (400, 800, 16) and r["backends_agree"]
    reference = recall_at_k_reference(*synthetic(400, 2, 16, "cpu"))
    assert (r["recall_t2i"], r["recall_i2t"]) == (reference["t2i"], reference["i2t"])
    assert 0 < r["recall_t2i"]["1"] < 100  # noisy copies: found, not always first
    assert r["ratio_torch"] > 0 and r["ratio_faiss"] > 0 and r["peak_rss_mb"] > 0
    saved(r, "recall", results)


def test_doc_renders_the_suite_with_goals_and_no_missing_bench_prose(results, tmp_path):
    (results / "notes.json").write_text(json.dumps({"not": "a bench"}))  # not the suite's: never rendered
    doc = tmp_path / "benchmarks.md"
    out = subprocess.run(
        [sys.executable, "bench/run_all.py", "--render-only", "--results", str(results), "--doc", str(doc)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    text = doc.read_text()
    for item in (
        "extraction throughput",
        "extraction peak memory",
        "text embedding throughput",
        "φ pretraining samples/s",
        "recall evaluation time",
        "### extract",
        "### recall",
    ):
        assert item in text
    # a toy-sized extraction cannot meet the goal stated at 10 million rows
    assert "run at 20,000 rows, not the goal's 10,000,000" in text
    assert "notes" not in text and "### cost" not in text and "Table" not in text  # absent results: not rendered
    assert "- cost: `.venv/bin/python bench/run_all.py --only cost`" in text  # but named, with how to run them
    assert "--only extract`" not in text
    assert "issue" not in text.lower() and "session" not in text.lower()


def _recall(new_old_t2i_5: float = 1.0) -> dict:
    case = {"1": 1.0, "5": 1.0, "10": 1.0, "50": 1.0}
    recall = {d: {c: dict(case) for c in ("old/old", "new/old", "new/new", "orig-new/new")} for d in ("t2i", "i2t")}
    recall["t2i"]["new/old"]["5"] = new_old_t2i_5
    return recall


def test_quality_table_renders_each_run_with_its_failing_checks_and_tightest_margin():
    margin = {"margin": 0.3, "low": -0.1, "high": 0.7, "p_better": 0.8}
    margins = {d: {k: dict(margin) for k in ("1", "5", "10")} for d in ("t2i", "i2t")}
    margins["i2t"]["10"] = {"margin": -0.5, "low": -1.25, "high": 0.25, "p_better": 0.1}
    run = {
        "method": "xbt",
        "seed": 2,
        "recall": _recall(0.5),
        "gate": {"passed": False, "failures": [["t2i", 5, 0.5, 1.0]]},
        "gate_margins": {"n_boot": 10, **margins},
        "trainable_params": 1234,
        "timings_s": {"embed": 1.0, "train": 2.5},
    }
    result = {
        "old": "zoo/old",
        "new": "zoo/new",
        "data": {"folder": "w", "world": {"seed": 0}},
        "settings": [],
        "seeds": [2],
        "runs": [run],
        "table": [],
    }
    text = "\n".join(run_all.render_result("quality", result))
    assert (
        "| xbt | 2 | 1.00 / 0.50 / 1.00 | 1.00 / 1.00 / 1.00 | 1.0 / 1.0 | failed | t2i R@5 0.5 vs 1.0 | "
        "i2t R@10 -0.50 [-1.25, +0.25] | 1,234 | 3.5 |"
    ) in text
    assert "the built-in world {'seed': 0}" in text and "Mean over seeds" not in text  # one seed: no mean table


def test_chain_table_names_every_gate():
    gate = {"passed": True, "failures": []}
    link = {"recall": _recall(), "gate": gate}
    cases = ("old/old", "mid/old", "new/old (chain)")
    table = {d: {c: {"1": 1.0, "5": 2.0, "10": 3.0} for c in cases} for d in ("t2i", "i2t")}
    result = {
        "old": "o",
        "mid": "m",
        "new": "n",
        "data": {"folder": "w", "world": None},
        "settings": ["pretrain.sigma=0"],
        "runs": [
            {
                "seed": 0,
                "links": [link, {**link, "no_regression": {"passed": False, "failures": [1, 2]}}],
                "direct": link,
                "table": table,
            }
        ],
    }
    text = "\n".join(run_all.render_result("chain", result))
    assert "| mid/old | 1.00 / 2.00 / 3.00 | 1.00 / 2.00 / 3.00 |" in text
    assert "link 2 against link 1 (no regression): failed (2 failing checks)" in text
    assert "the world in w" in text and "['pretrain.sigma=0']" in text


def test_the_suites_table_benches_take_the_arguments_run_all_gives_them():
    import importlib

    for name, b in run_all.BENCHES.items():
        if not b.fast:
            module = importlib.import_module(f"bench.{Path(b.script).stem}")
            args = module.parser().parse_args(list(b.args))
            assert args.json_out == "" and not getattr(args, "data", ""), name  # its own world under its state


def test_real_size_phi_rate_counts_the_rows_each_method_reads():
    from bench.real_size import measure_phi

    xbt = measure_phi("B/32", "L/14", "xbt", "cpu", steps=2)
    assert (xbt["per"], xbt["items"], xbt["epochs"]) == ("corpus row", 2 * 1024, 3)
    blend = measure_phi("B/32", "L/14", "xbt-gallery-blend", "cpu", steps=2)
    assert (blend["per"], blend["items"], blend["epochs"]) == ("pair row", 2 * 256, 3)
    assert blend["terms"]["corpus_weight"] == 0.0 and blend["per_s"] > 0


def test_real_size_projection_divides_each_stage_by_its_measured_rate():
    from bench.real_size import project

    rates = [("B/32", "text", 1000.0), ("B/32", "image", 100.0), ("L/14", "text", 500.0), ("L/14", "image", 20.0)]
    embed = {(a, tower): {"per_s": r} for a, tower, r in rates}
    train = {("B/32", "L/14", "xbt"): {"per_s": 10.0}, ("B/32", "L/14", "base"): {"per_s": 8.0}}
    phi = {
        "xbt": {"per_s": 1e5, "epochs": 3},
        "xbt-gallery": {"per_s": 5e4, "epochs": 3},
        "xbt-gallery-blend": {"per_s": 2e4, "epochs": 4},
    }
    t = project(embed, train, phi, "B/32", "L/14")
    assert t["hours"]["xbt"]["corpus_old_text"] == round(67e6 / 1000 / 3600, 1)
    assert t["hours"]["xbt"]["phi_pretrain"] == round(3 * 67e6 / 1e5 / 3600, 1)
    assert t["hours"]["xbt-gallery"]["phi_pretrain"] == round(3 * 67e6 / 5e4 / 3600, 1)
    # the blend's φ reads no corpus: its passes are over the pairs, and it embeds only the pairs
    assert t["hours"]["xbt-gallery-blend"]["phi_pretrain"] == round(4 * 4e6 / 2e4 / 3600, 1)
    assert t["hours"]["xbt-gallery-blend"]["pairs_new"] == t["hours"]["xbt-gallery"]["pairs_new"]
    assert not any(k.startswith("corpus") for k in t["hours"]["xbt-gallery-blend"])
    assert t["hours"]["base"]["old_targets"] == round((4e6 / 100 + 4e6 / 1000) / 3600, 1)
    assert t["hours"]["base"]["train"] == round(4e6 / 8 / 3600, 1)
    assert t["backfill_hours"] == round(1e9 / 20 / 3600, 1)
    assert t["xbt_over_base"] == round(t["total_hours"]["xbt"] / t["total_hours"]["base"], 2)
    r = {
        "embed": [{"arch": a, "tower": tw, "per_s": e["per_s"], "peak_rss_mb": 900.0} for (a, tw), e in embed.items()],
        "train": [{"old": "B/32", "new": "L/14", "method": "xbt", "per_s": 10.0, "peak_rss_mb": 3000.0}],
        "table6": [t],
        "paper_data": {"corpus_texts": 67_000_000, "pairs": 4_000_000},
        "paper_hours": {"xbt_pretrain": 1.55, "xbt_train": 2.84, "base": 5.66},
    }
    short = {"B/32": {"per_s": 4000.0}, "L/14": {"per_s": 2000.0}}  # texts/s at 16 tokens
    t16 = project(embed, train, phi, "B/32", "L/14", short)
    assert t16["hours"]["xbt"]["corpus_new_text"] == round(67e6 / 2000 / 3600, 1)  # the corpus at its own rate
    assert t16["hours"]["xbt"]["train"] == t["hours"]["xbt"]["train"] and t16["hours"]["base"] == t["hours"]["base"]
    assert t16["total_hours"]["xbt-gallery"] < t["total_hours"]["xbt-gallery"]
    page = "\n".join(run_all.render_result("real_size", r))
    assert "| B/32 -> L/14 | xbt-gallery |" in page and "| L/14 | image | 20.0 | 900 MiB |" in page
    assert "corpus tokens" not in page  # no shorter lengths measured: no such table
    r["corpus_lengths"] = [{"old": "B/32", "new": "L/14", "corpus_tokens": 16, **t16}]
    r["embed"].append({"arch": "L/14", "tower": "text", "tokens": 16, "per_s": 2000.0, "peak_rss_mb": 800.0})
    page = "\n".join(run_all.render_result("real_size", r))
    assert "| L/14 | text, 16 tokens | 2000.0 | 800 MiB |" in page
    corpus = round(t16["hours"]["xbt"]["corpus_old_text"] + t16["hours"]["xbt"]["corpus_new_text"], 1)
    row = f"| B/32 -> L/14 | 16 | {corpus:,} h, {t16['total_hours']['xbt']:,} h, {t16['xbt_over_base']} |"
    assert row in page and "| B/32 -> L/14 | 77 |" in page
    (goal,) = run_all.goal_rows("real_size", r)
    assert goal[3] == (t["xbt_over_base"] <= 0.5) and f"{t['xbt_over_base']}x" in goal[2]
    assert f"xbt-gallery-blend {t['xbt_gallery_blend_over_base']}x" in goal[2]
    assert (
        f"at 16-token corpus texts XBT {t16['xbt_over_base']}x, xbt-gallery {t16['xbt_gallery_over_base']}x"
        in (goal[2])
    )


def test_precision_results_render_speed_and_agreement_per_model():
    r = {
        "cpu_bf16_flags": ["amx_bf16"],
        "real_size": [
            {
                "arch": "L/14",
                "tower": "text",
                "fp32_per_s": 20.0,
                "bf16_per_s": 60.0,
                "speedup": 3.0,
                "min_cosine": 0.9999,
            }
        ],
        "zoo": [
            {
                "model": "zoo/new",
                "images": 1000,
                "text_cosine_min": 0.9998,
                "text_cosine_mean": 0.99999,
                "image_cosine_min": 0.9997,
                "image_cosine_mean": 0.99998,
                "nearest_caption_changed": 0.012,
            }
        ],
    }
    page = "\n".join(run_all.render_result("precision", r))
    assert "| L/14 | text | 20.0 | 60.0 | 3.0x | 0.9999 |" in page and "bf16 units: amx_bf16" in page
    assert "| zoo/new | 0.9998 / 0.99999 | 0.9997 / 0.99998 | 1.2% of 1,000 | n/a / n/a | n/a / n/a |" in page
    assert "bf16 units: none" in "\n".join(run_all.render_result("precision", {**r, "cpu_bf16_flags": []}))
    assert run_all.goal_rows("precision", r) == []  # a result from before the FLOPs were counted: no goal row

    # FLOPs counted: TFLOP/s on every device, MFU against the GPU's peak only where there is one
    flops = {"gflops_per_item": 13.3, "fp32_tflops": 0.266, "bf16_tflops": 0.798, "bf16_mfu": None}
    cpu = {**r, "device": "cpu", "mfu_goal": 0.4, "peak_bf16_tflops": None}
    cpu["real_size"] = [{**r["real_size"][0], **flops}]
    assert "| 0.9999 | 13.3 | 0.266 / 0.798 | n/a |" in "\n".join(run_all.render_result("precision", cpu))
    ((item, goal, measured, met, _),) = run_all.goal_rows("precision", cpu)
    assert met is None and measured == "not measured (no GPU): 0.798 TFLOP/s in bf16" and "40%" in goal
    gpu = {**cpu, "device": "cuda", "peak_bf16_tflops": 989.4}
    gpu["real_size"] = [{**cpu["real_size"][0], "bf16_tflops": 346.3, "bf16_mfu": 0.35}]
    ((_, _, measured, met, reason),) = run_all.goal_rows("precision", gpu)
    assert met is False and measured == "35.0% (346.3 of 989.4 TFLOP/s)" and reason
    gpu["real_size"][0]["bf16_mfu"] = 0.41
    assert run_all.goal_rows("precision", gpu)[0][3] is True


def test_serving_results_render_their_goals_and_the_backfill_figure(tmp_path):
    run = {"command": "x", "seconds": 1.0, "date": "d", "commit": "c", "memory_gb": 1.0, "loadavg_1m": [0.1, 0.2]}
    case = {"1": 30.0, "5": 70.0, "10": 85.0}
    curve = [
        {"fraction": f, "cluster-ends": {k: v + 10 * f for k, v in case.items()}, "random": dict(case)}
        for f in (0.0, 0.25, 0.5, 1.0)
    ]
    curve[-1]["random"] = curve[-1]["cluster-ends"]
    curve[2]["random"] = {k: v + 9 for k, v in case.items()}  # random ahead at 50%
    for c in curve:
        c["random_min_max"] = {k: [v - 1, v + 1] for k, v in c["random"].items()}
    results = tmp_path / "results"
    results.mkdir()
    backfill = {
        "machine": "m",
        "run": run,
        "world_seed": 7,
        "images": 100,
        "method": "procrustes",
        "curve": curve,
        "order": "cluster-ends",
        "random_seeds": 5,
        "recall_t2i": {"old/old": case, "new/old": case, "orig-new/new": curve[-1]["cluster-ends"]},
    }
    load = {
        "machine": "m",
        "run": run,
        "items": 1000000,
        "index": "flat",
        "concurrency": 8,
        "p99_ms": 80.0,
        "p50_ms": 60.0,
        "throughput_rps": 120.0,
        "server_cpu_ms_per_request": 12.0,
        "failed": 0,
        "requests": 900,
        "swap": {"answers_by_version": {"1": 500, "2": 400}, "first_answer_by_new_version_s": 7.0},
    }
    (results / "serving_backfill.json").write_text(json.dumps(backfill))
    (results / "serving_load.json").write_text(json.dumps(load))
    doc = tmp_path / "docs" / "benchmarks.md"
    run_all.main(["--render-only", "--results", str(results), "--doc", str(doc)])
    text = doc.read_text()
    assert "| backfill order | cluster-ends ahead of random" in text
    assert "behind at R@1 at 50% by 4.00" in text  # 39 vs 35
    assert "missed by 30.0 ms" in text and "| champion swap mid-load |" in text
    svg = (doc.parent / run_all.BACKFILL_FIGURE).read_text()
    assert svg.startswith("<svg") and svg.count("<polyline") == 2 and f"]({run_all.BACKFILL_FIGURE})" in text
    assert svg.count("<polygon") == 1 and "random: the mean of 5 orders" in text  # their range, shaded


def test_compile_results_render_speed_overhead_and_break_even():
    row = {
        "model": "L/14",
        "tower": "text",
        "precision": "bf16",
        "items": 2048,
        "batch": 512,
        "plain_per_s": 40.0,
        "compiled_per_s": 60.0,
        "speedup": 1.5,
        "graphs_compiled": 4,
        "compile_overhead_s": 12.5,
        "pays_after_items": 1500,
        "min_cosine": 0.9999,
        "still_compiled": True,
    }
    slower = {**row, "tower": "image", "speedup": 0.98, "pays_after_items": None, "still_compiled": False}
    page = "\n".join(run_all.render_result("compile", {"real_size": [row, slower], "zoo": [row]}))
    assert "| L/14 | text | bf16 | 2,048 (512) | 40.0 | 60.0 | 1.5x | 4 | 12.5 s | 1,500 items | 0.9999 |" in page
    assert "| 60.0 (fell back) | 0.98x | 4 | 12.5 s | never |" in page
    assert "compile" in run_all.BENCHES and run_all.BENCHES["compile"].takes_device
