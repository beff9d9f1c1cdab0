"""The paper-table benches (quality, chain, ablations, zeroshot, cost) on a tiny world with tiny untrained CLIPs:
each row is what the product's flow reported for that run."""

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_WORLD

sys.path.insert(0, str(REPO))

from bench import ablations, chain, common, cost, quality, zeroshot  # noqa: E402

pytestmark = pytest.mark.slow

SMALL = ["--set", "pretrain.epochs=1", "--set", "pretrain.batch_size=64", "--set", "finetune.batch_size=32"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny):
    """The benches' world (with its world.json), tiny's old and new models, a mid model, a run folder."""
    from worlds.tinyclip import TinyClipSpec, make_tiny_clip

    root = tmp_path_factory.mktemp("tables")
    common.world_paths(root / "world", TINY_WORLD)
    mid = make_tiny_clip(root / "mid", TinyClipSpec(width=32, layers=1, heads=2, embed_dim=28), seed=3)
    return {"root": root, "old": tiny["old"], "mid": str(mid), "new": tiny["new"]}


def test_world_flags_are_checked_before_anything_runs():
    assert common.world_overrides(["seed=1", "user_phrasing=0.5"]) == {"seed": 1, "user_phrasing": 0.5}
    for bad, says in (
        (["colour=1"], "FIELD one of"),
        (["seed"], "FIELD=VALUE"),
        (["seed=x"], "must be a number"),
        (["seed=-1"], "seed must be a non-negative"),
    ):
        with pytest.raises(ValueError, match=says):
            common.world_overrides(bad)
    args = quality.parser().parse_args(["--world", "seed=1", "--world", "pair_images=50"])
    assert common.world_dir(args) == common.BENCH_STATE / "world-pair_images50-seed1"  # named by its overrides


def flags(world, *more: str) -> list[str]:
    return [
        "--old",
        world["old"],
        "--new",
        world["new"],
        "--data",
        str(world["root"] / "world"),
        "--out",
        str(world["root"] / "runs"),
        *SMALL,
        *more,
    ]


def report_of(row: dict) -> dict:
    return json.loads(Path(row["report"]).read_text())


@pytest.fixture(scope="module")
def quality_result(prefect_harness, world):
    return quality.run(quality.parser().parse_args(flags(world, "--methods", "procrustes", "xbt")))


def test_quality_rows_are_the_flows_reports(quality_result, world):
    res = quality_result
    assert [(r["method"], r["seed"]) for r in res["runs"]] == [("procrustes", 0), ("xbt", 0)]
    assert res["data"]["world"] == {**res["data"]["world"], **TINY_WORLD} and res["settings"] == SMALL[1::2]
    for row in res["runs"]:
        report = report_of(row)
        assert report["method"] == row["method"] and report["config"]["seed"] == 0
        assert row["recall"] == report["recall"] and row["gate"] == report["gate"]
        assert row["timings_s"] == report["timings_s"] and row["gate_margins"] == report["gate_margins"]
        assert row["model"] == f"models:/{report['promotion']['model']}/{report['promotion']['version']}"
    procrustes, xbt = res["runs"]
    assert procrustes["trainable_params"] == 32 * 24  # W: D_new x D_old, the tiny new and old models' sizes
    assert xbt["trainable_params"] > 0 and xbt["timings_s"]["pretrain"] > 0
    # one seed: the table's mean is the run itself, at the gate's K values
    for row, run in zip(res["table"], res["runs"]):
        assert row["new/old"] == {
            d: {k: run["recall"][d]["new/old"][k] for k in ("1", "5", "10")} for d in ("t2i", "i2t")
        }


def test_the_same_upgrade_again_is_served_from_the_flows_cache(quality_result, world):
    args = quality.parser().parse_args(flags(world))
    again = common.upgrade(args, "procrustes", 0)
    assert again["recall"] == quality_result["runs"][0]["recall"]
    assert again["steps"]["fit-head"] == again["steps"]["evaluate"] == "Cached"


@pytest.fixture(scope="module")
def chain_result(prefect_harness, world):
    return chain.run(chain.parser().parse_args(flags(world, "--mid", world["mid"])))


def test_chain_link2_builds_on_link1s_version_against_the_root_gallery(chain_result, world):
    from xbtcore.bundle import read_meta

    (run,) = chain_result["runs"]
    link1, link2 = run["links"]
    assert link2["old"] == link1["model"] and link1["model"].startswith("models:/xbt-")
    r1, r2, direct = report_of(link1), report_of(link2), report_of(run["direct"])
    assert (r1["new"], r2["old"], r2["new"]) == (world["mid"], link1["model"], world["new"])
    assert (direct["old"], direct["new"]) == (world["old"], world["new"])
    # link 2's gallery side is the root model: the same space, the same old/old, link 1 as its prev/old
    assert r2["space"] == r1["space"] == direct["space"]
    meta = read_meta(r2["bundle"])
    assert meta.root_model == world["old"] and meta.chain == [world["old"], world["mid"], world["new"]]
    for d in ("t2i", "i2t"):
        assert r2["recall"][d]["old/old"] == r1["recall"][d]["old/old"]
        assert r2["recall"][d]["prev/old"] == r1["recall"][d]["new/old"]
        assert run["table"][d] == {
            "old/old": r1["recall"][d]["old/old"],
            "mid/old": r1["recall"][d]["new/old"],
            "new/old (chain)": r2["recall"][d]["new/old"],
            "new/old (direct)": direct["recall"][d]["new/old"],
        }
    assert link2["no_regression"] == r2["no_regression"] and "no_regression" not in link1


def test_zeroshot_of_a_chain_bundle_takes_its_root_and_base(chain_result, world):
    link2 = chain_result["runs"][0]["links"][1]
    bundle = str(Path(link2["report"]).parent / "bundle")
    res = zeroshot.run(zeroshot.parser().parse_args(flags(world, "--bundle", bundle)))
    assert (res["old"], res["new"], res["seed"], res["report"]) == (world["old"], world["new"], None, None)
    assert set(res["accuracy"]) == {"shape", "colour"}
    for acc in res["accuracy"].values():
        assert set(acc) == {"old/old", "orig-new/new", "new/old", "new/new"}
        assert all(0 <= a <= 100 for a in acc.values())


def test_zeroshot_without_a_bundle_upgrades_through_the_flow(quality_result, world):
    res = zeroshot.run(zeroshot.parser().parse_args(flags(world)))
    xbt = quality_result["runs"][1]
    assert res["report"] == xbt["report"] and res["seed"] == 0  # the same upgrade: the same run folder


def test_zeroshot_labels_are_the_eval_scenes(world):
    from worlds import shapes
    from xbtcore.data import read_pairs

    spec = common.world_spec(world["root"] / "world")
    evalset = read_pairs(world["root"] / "world" / "eval.parquet")
    keep, labels = zeroshot.single_object_labels(evalset, spec)
    items = shapes.scenes_with_captions(spec.seed, "eval", spec.eval_images, spec.captions_per_eval_image)
    assert keep.tolist() == [i for i, (s, _) in enumerate(items) if len(s.objects) == 1] and len(keep) > 0
    assert [list(shapes.SHAPES)[j] for j in labels["shape"]] == [items[i][0].objects[0].shape for i in keep]
    assert [list(shapes.COLOURS)[j] for j in labels["colour"]] == [items[i][0].objects[0].colour for i in keep]
    with pytest.raises(ValueError, match="captions differ"):
        zeroshot.single_object_labels(evalset, shapes.WorldSpec(**{**TINY_WORLD, "seed": 1}))


def test_accuracy_is_top1_against_an_independent_count():
    images = torch.nn.functional.normalize(torch.randn(50, 6), dim=-1)
    classes = torch.nn.functional.normalize(torch.randn(4, 6), dim=-1)
    labels = torch.randint(0, 4, (50,))
    hits = sum(int(max(range(4), key=lambda c: float(images[i] @ classes[c])) == labels[i]) for i in range(50))
    assert zeroshot.accuracy(images, classes, labels) == round(100 * hits / 50, 2)


def test_ablations_change_one_thing_each(prefect_harness, world):
    from xbtcore.data import read_pairs

    res = ablations.run(
        ablations.parser().parse_args(flags(world, "--only", "default", "corpus-1/4", "pairs-1/2", "no-noise"))
    )
    rows = res["ablations"]
    assert list(rows) == ["default", "corpus-1/4", "pairs-1/2", "no-noise"]
    distinct = ablations.distinct_texts(str(world["root"] / "world" / "corpus.parquet"))
    assert rows["default"]["corpus"] == distinct and rows["corpus-1/4"]["corpus"] == distinct // 4
    assert (rows["default"]["pairs"], rows["pairs-1/2"]["pairs"]) == (96, 48)  # one caption per pair image
    half = read_pairs(rows["pairs-1/2"]["params"]["pairs"])
    full = read_pairs(world["root"] / "world" / "pairs.parquet")
    assert half.images == full.images[: half.n_images] and half.captions == full.captions[: len(half.captions)]
    assert report_of(rows["no-noise"]["runs"][0])["config"]["pretrain"]["sigma"] == 0
    for row in rows.values():
        assert row["gate_passed"] == [r["gate"]["passed"] for r in row["runs"]]
        assert row["old/old"] == rows["default"]["old/old"]  # one gallery, one eval set


def test_cost_times_a_method_from_an_empty_state_in_its_own_process(world):
    res = cost.run(cost.parser().parse_args([*flags(world)[:6], *SMALL, "--methods", "xbt"]))
    (xbt,) = res["rows"]
    assert xbt["pretrain_s"] > 0 and xbt["embed_s"] > 0.1  # an empty cache: every embedding is computed
    assert xbt["samples"] == {"corpus_texts": xbt["samples"]["corpus_texts"], "pairs": 96, "old_model_images": 0}
    assert xbt["samples"]["corpus_texts"] > 1000  # the corpus' distinct texts, by both text encoders
    assert xbt["upgrade_s"] == pytest.approx(sum(xbt[f"{k}_s"] for k in cost.UPGRADE_STEPS), abs=0.005)
    assert xbt["peak_rss_mb"] > 100 and xbt["trainable_params"] > 0
    assert "xbt_over_base" not in res  # no Base row to compare with


def test_cost_counts_what_each_method_embeds_and_compares_xbt_with_base():
    assert cost.embedded("base", [], corpus=1000, pairs=96, images=90) == {
        "corpus_texts": 0,
        "pairs": 96,
        "old_model_images": 90,
    }  # Eqn. 6: the old model on the pairs
    assert cost.embedded("procrustes", [], 1000, 96, 90)["corpus_texts"] == 1000
    assert cost.embedded("xbt", ["pretrain.source=image", "pretrain.pair_weight=0"], 1000, 96, 90) == {
        "corpus_texts": 0,
        "pairs": 96,
        "old_model_images": 90,
    }  # φ on the pairs' images runs the old image tower
    rows = [{"method": "xbt", "upgrade_s": 3.0}, {"method": "base", "upgrade_s": 4.0}]
    assert cost.against_goal(rows) == {"xbt_over_base": 0.75, "goal_met": False}
    assert cost.against_goal([{**rows[0], "upgrade_s": 2.0}, rows[1]])["goal_met"] is True
