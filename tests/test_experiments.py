"""experiments/: the runner on a tiny config, every committed config's runs parsing, and the probes at toy sizes."""

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_WORLD

sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402
from experiments import (  # noqa: E402
    backfill_order,
    backfill_table,
    head_seeds,
    headroom,
    phi_alone,
    run,
    validation_table,
)

CONFIGS = sorted((REPO / "experiments" / "configs").glob("*.json"))


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("experiments")
    common.world_paths(root / "world", TINY_WORLD)
    return {"root": root, "flags": ["--old", tiny["old"], "--new", tiny["new"], "--data", str(root / "world")]}


def test_the_validation_table_reads_each_candidate_as_auto_does(tmp_path):
    def margins(t2i_r1, low):  # every check +1 with interval [low, 2], but t2i R@1
        out = {d: {k: {"margin": 1.0, "low": low, "high": 2.0} for k in ("1", "5", "10")} for d in ("t2i", "i2t")}
        out["t2i"]["1"] = {"margin": t2i_r1, "low": min(low, t2i_r1), "high": 2.0}
        return out

    def recall(new_new_t2i):
        return {
            d: {"orig-new/new": {"1": 40.0}, "new/new": {"1": new_new_t2i if d == "t2i" else 40.5}}
            for d in ("t2i", "i2t")
        }

    def candidate(t2i_r1, low, new_new):
        return {"ran": True, "eligible": True, "margins": margins(t2i_r1, low), "recall": recall(new_new)}

    runs = [
        {"method": "xbt-gallery", "seed": 0, "validation": {"xbt-gallery": candidate(2.5, 0.25, 39.5)}},
        {"method": "xbt-gallery", "seed": 1, "validation": {"xbt-gallery": candidate(-0.5, 0.25, 39.5)}},
        {"method": "xbt-gallery", "seed": 2, "validation": {"xbt-gallery": candidate(2.5, 0.25, 38.75)}},
        {"method": "auto", "seed": 0, "validation": {"procrustes": candidate(1.0, 0.5, 40.0), "base": {"ran": False}}},
    ]
    path = tmp_path / "study.json"
    path.write_text(json.dumps({"runs": [{"name": "lam=2", "result": {"runs": runs}}]}))
    rows = validation_table.table([path])
    assert rows[2:6] == [
        "| lam=2 | 0 | xbt-gallery | +2.50 / +1.00 / +1.00 | +1.00 / +1.00 / +1.00 | +0.25 / +0.25 | 0.50 / -0.50 "
        "| yes |",
        "| lam=2 | 1 | xbt-gallery | -0.50 / +1.00 / +1.00 | +1.00 / +1.00 / +1.00 | -0.50 / +0.25 | 0.50 / -0.50 "
        "| no (interval) |",
        "| lam=2 | 2 | xbt-gallery | +2.50 / +1.00 / +1.00 | +1.00 / +1.00 / +1.00 | +0.25 / +0.25 | 1.25 / -0.50 "
        "| no (new/new) |",
        "| lam=2 | 0 | procrustes | +1.00 / +1.00 / +1.00 | +1.00 / +1.00 / +1.00 | +0.50 / +0.50 | 0.00 / -0.50 "
        "| yes |",
    ]
    assert len(rows) == 2 + 4 + 2  # the candidate auto did not run has no row


def test_the_backfill_table_gives_each_order_against_the_random_mean_and_range(tmp_path):
    def point(r1):  # one fraction's R@1 / 5 / 10
        return {"1": r1, "5": 50.0, "10": 70.0}

    backfill = {
        "fractions": [0.0, 0.25, 0.5, 1.0],
        "curves": {
            "learned": [point(10), point(13.5), point(14), point(20)],
            "isolated-first": [point(10), point(11), point(16), point(20)],
            "random": [point(10), point(12), point(15), point(20)],
        },
        "random_min_max": [
            {k: [v, v] for k, v in point(10).items()},
            {k: [v - 0.5, v + 0.5] for k, v in point(12).items()},
            {k: [v - 0.25, v + 1] for k, v in point(15).items()},
            {k: [v, v] for k, v in point(20).items()},
        ],
    }
    full = {"t2i": {"orig-new/new": point(20)}}
    runs = [{"method": "auto", "seed": 2, "backfill": backfill, "recall": full}, {"method": "procrustes", "seed": 2}]
    path = tmp_path / "study.json"
    path.write_text(json.dumps({"runs": [{"name": "v", "result": {"data": {"world": {"world": "w"}}, "runs": runs}}]}))
    rows = backfill_table.table([path])
    assert rows[2:4] == [
        "| w | 2 | learned | +1.50 / +0.00 / +0.00 | -1.00 / +0.00 / +0.00 | -1.00 |",
        "| w | 2 | isolated-first | -1.00 / +0.00 / +0.00 | +1.00 / +0.00 / +0.00 | -1.00 |",
    ]
    assert rows[-2] == (
        "learned: 1 checks above the highest random order, 4 inside their range, 1 below the lowest (by 0.75); "
        "never under the compatible query alone on 1 of 1 runs, at orig-new/new at 100% on 1 of 1"
    )
    assert rows[-1].startswith("isolated-first: 0 checks above the highest random order, 5 inside their range")
    assert backfill_table.table([path], "old-same-text")[2].startswith("| old-same-text | 2 | learned |")


def test_grid_and_variants_make_one_run_each():
    config = {
        "script": "bench/quality.py",
        "args": ["--seeds", "0"],
        "grid": {"pretrain.sigma": [0, 0.1], "--new": ["zoo/mid"]},
        "variants": {"base": ["--methods", "base"]},
    }
    assert run.runs_of(config) == {
        "pretrain.sigma=0,new=zoo/mid": ["--seeds", "0", "--set", "pretrain.sigma=0", "--new", "zoo/mid"],
        "pretrain.sigma=0.1,new=zoo/mid": ["--seeds", "0", "--set", "pretrain.sigma=0.1", "--new", "zoo/mid"],
        "base": ["--seeds", "0", "--methods", "base"],
    }
    assert run.runs_of({"script": "bench/chain.py"}) == {"default": []}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_committed_config_parses(path):
    config = run.read_config(path)
    assert config["about"] and (REPO / config["script"]).is_file()
    assert run.parsed_runs(path)


def test_a_bad_setting_names_the_config_and_the_run(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"script": "bench/quality.py", "variants": {"oops": ["--set", "pretrain.nope=1"]}}))
    with pytest.raises(ValueError, match=r"bad.json: run 'oops'.*unknown setting 'nope'"):
        run.parsed_runs(path)
    path.write_text(json.dumps({"script": "bench/quality.py", "variants": {"flag": ["--nope"]}}))
    with pytest.raises(ValueError, match=r"run 'flag'.*unknown flags \['--nope'\]"):
        run.parsed_runs(path)


def test_runner_writes_results_named_from_the_config(prefect_harness, world, tmp_path):
    path = tmp_path / "maps.json"
    path.write_text(
        json.dumps(
            {
                "about": "the two closed-form maps",
                "script": "bench/quality.py",
                "args": [*world["flags"], "--out", str(world["root"] / "runs")],
                "grid": {"--methods": ["procrustes", "lstsq"]},
            }
        )
    )
    record = run.run_config(path, tmp_path / "results")
    saved = json.loads((tmp_path / "results" / "maps.json").read_text())
    assert saved == record and saved["config"] == "maps" and saved["about"] == "the two closed-form maps"
    assert saved["command"] == f"python experiments/run.py {path}" and saved["commit"] and saved["date"]
    assert [r["name"] for r in saved["runs"]] == ["methods=procrustes", "methods=lstsq"]
    for r, method in zip(saved["runs"], ("procrustes", "lstsq")):
        (row,) = r["result"]["runs"]
        assert row["method"] == method and r["flags"][-2:] == ["--methods", method]
        assert row["recall"] == json.loads(Path(row["report"]).read_text())["recall"]


@pytest.fixture(scope="module")
def flow_report(prefect_harness, world):
    """An upgrade's report on the same world and models: the probes' old/old must be its old/old."""
    args = common.table_parser("").parse_args([*world["flags"], "--out", str(world["root"] / "runs")])
    return common.upgrade(args, "procrustes", 0)


def test_headroom_probe_reports_old_old_as_the_flow_does(world, flow_report):
    res = headroom.run(headroom.parser().parse_args([*world["flags"], "--epochs", "1", "2", "--batch-size", "32"]))
    assert res["old/old"] == flow_report["recall"]["t2i"]["old/old"]
    assert [h["epochs"] for h in res["heads"]] == [1, 2] and res["pairs"] == TINY_WORLD["pair_images"]
    assert all(0 <= r <= 100 for h in res["heads"] for r in h["new/old"].values())


def test_phi_alone_is_the_xbt_head_on_the_unmodified_new_model(world, flow_report, tmp_path):
    settings = ["--set", "pretrain.epochs=1", "--set", "pretrain.batch_size=64", "--set", "pretrain.pair_weight=0"]
    res = phi_alone.run(phi_alone.parser().parse_args([*world["flags"], *settings, "--out", str(tmp_path)]))
    (seed0,) = res["runs"]
    for d in ("t2i", "i2t"):
        assert seed0["recall"][d]["old/old"] == flow_report["recall"][d]["old/old"]
        assert seed0["recall"][d]["orig-new/new"] == flow_report["recall"][d]["orig-new/new"]
    assert set(seed0["transfer"]) == {"i2i", "i2i_mean_cos", "t2t", "t2t_mean_cos", "image_lands_in_text_region"}
    assert len(list(tmp_path.glob("head-*.safetensors"))) == 1  # the flow's head stage wrote it


def test_head_seeds_probe_gives_the_upgrades_own_head_at_offset_0(world, prefect_harness, tmp_path):
    small = ["pretrain.min_steps=4", "pretrain.epochs=1", "pretrain.batch_size=64", "pretrain.pair_batch_size=32"]
    flags = [*world["flags"], "--method", "xbt-gallery", "--seeds", "0", "--head-offsets", "0", "7"]
    res = head_seeds.run(
        head_seeds.parser().parse_args([*flags, *(x for v in small for x in ("--set", v)), "--out", str(tmp_path)])
    )
    args = common.table_parser("").parse_args(
        [*world["flags"], "--out", str(world["root"] / "runs"), *(x for v in small for x in ("--set", v))]
    )
    recall = common.upgrade(args, "xbt-gallery", 0)["recall"]
    (split,) = res["splits"]
    own, other = split["heads"]
    assert (own["head_seed"], other["head_seed"]) == (0, 7)
    for d in ("t2i", "i2t"):
        for k in ("1", "5", "10"):
            assert own[d][k]["margin"] == pytest.approx(recall[d]["new/old"][k] - recall[d]["old/old"][k], abs=0.011)
            assert own[d][k]["low"] <= own[d][k]["margin"]
        under = recall[d]["orig-new/new"]["1"] - recall[d]["new/new"]["1"]
        assert own[d]["new/new under, R@1"] == pytest.approx(under, abs=0.011)
    assert set(split["ensemble"]) == {"t2i", "i2t"}
    with pytest.raises(ValueError, match="frozen encoders only"):
        head_seeds.run(head_seeds.parser().parse_args([*world["flags"], "--method", "xbt"]))


def test_transfer_diagnostics_by_hand():
    from xbtcore.evaluate import Side

    g = torch.Generator().manual_seed(0)
    caption_image = torch.arange(6).repeat_interleave(2)  # 6 images, 2 captions each
    image = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    text = torch.nn.functional.normalize(image[caption_image] + 0.3 * torch.randn(12, 8, generator=g), dim=-1)
    old = Side(text=text, image=image)
    exact = phi_alone.transfer(old, old, caption_image)  # a φ that lands every image on its own old image
    assert exact["i2i"] == {"1": 100.0, "5": 100.0, "10": 100.0} and exact["i2i_mean_cos"] == pytest.approx(1.0)
    assert exact["image_lands_in_text_region"] == 0.0 and exact["t2t"]["1"] == 100.0
    # a φ that lands each image on its first caption: in the text region, everywhere
    on_caption = Side(text=text, image=text[::2])
    assert phi_alone.transfer(on_caption, old, caption_image)["image_lands_in_text_region"] == 100.0


def test_backfill_order_probe_subsets_keep_each_query_on_its_item_and_cross_fitting_picks_a_mix():
    import numpy as np

    from xbtcore.search import normalise

    rng = np.random.default_rng(0)
    truth = rng.standard_normal((80, 8))
    own = np.repeat(np.arange(80), 2)
    sides = (
        normalise(truth[own] + 0.9 * rng.standard_normal((160, 8))),
        normalise(truth + 0.6 * rng.standard_normal((80, 8))),
        normalise(truth[own] + 0.3 * rng.standard_normal((160, 8))),
        normalise(truth + 0.2 * rng.standard_normal((80, 8))),
        own,
    )
    items = np.array([70, 3, 41])
    q_old, v_old, q_new, v_new, sub_own = backfill_order.subset(sides, items)
    assert v_old.tolist() == sides[1][[3, 41, 70]].tolist() and sub_own.tolist() == [0, 0, 1, 1, 2, 2]
    assert q_old.tolist() == sides[0][[6, 7, 82, 83, 140, 141]].tolist()
    mix, worst = backfill_order.cross_fitted_mix(sides, splits=1)
    assert set(worst) == set(backfill_order.MIXES) and worst[mix] == max(worst.values())
    first_random = {"random seed 0": np.random.default_rng(0).permutation(80)}  # the random orders' first
    (adv,) = backfill_order.advantages(sides, first_random, 1).values()
    assert adv == [0.0] * 6  # against itself: no advantage at any check
