"""bench/zeroshot.py, bench/ablations.py, bench/chain.py and quality.py's ablation flags, on a tiny world."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from worlds import shapes
from xbtcore.data import read_pairs
from xbtcore.pretrain import CHAIN_FIT_WEIGHT
from worlds.tinyclip import TinyClipSpec, make_tiny_clip

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import ablations, chain, chain_fit, quality, zeroshot

SPEC = shapes.WorldSpec(corpus_captions=300, pair_images=96, eval_images=16)
SMALL = ["--set", "pretrain.epochs=1", "--set", "pretrain.batch_size=64", "--set", "finetune.batch_size=32",
         "--set", "finetune.checkpoint_every=1000"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench6")
    shapes.write_world(root / "world", SPEC)
    make_tiny_clip(root / "old", TinyClipSpec(width=32, layers=1, heads=2, embed_dim=24), seed=1)
    make_tiny_clip(root / "mid", TinyClipSpec(width=40, layers=1, heads=2, embed_dim=32), seed=3)
    make_tiny_clip(root / "new", TinyClipSpec(width=48, layers=1, heads=2, embed_dim=40), seed=2)
    return root


def _flags(root: Path) -> list[str]:
    return ["--old", str(root / "old"), "--new", str(root / "new"), "--data", str(root / "world"),
            "--cache", str(root / "cache"), "--device", "cpu", *SMALL]


def _in_range(recall: dict) -> bool:
    """Every R@K of a {direction or case: {case or direction: {K: r}}} dict is a percentage."""
    return all(0 <= r <= 100 for d in recall.values() for case in d.values() for r in case.values())


def test_zeroshot_labels_match_the_eval_split_and_accuracies_are_percentages(tiny):
    evalset = read_pairs(tiny / "world" / "eval.parquet")
    keep, labels = zeroshot.single_object_labels(evalset, SPEC.seed)
    items = shapes.scenes_with_captions(SPEC.seed, "eval", SPEC.eval_images, SPEC.captions_per_eval_image)
    assert keep.tolist() == [i for i, (s, _) in enumerate(items) if len(s.objects) == 1] and len(keep) > 0
    assert [list(shapes.SHAPES)[j] for j in labels["shape"]] == [items[i][0].objects[0].shape for i in keep]
    assert [list(shapes.COLOURS)[j] for j in labels["colour"]] == [items[i][0].objects[0].colour for i in keep]
    with pytest.raises(SystemExit, match="world seed"):
        zeroshot.single_object_labels(evalset, SPEC.seed + 1)

    res = zeroshot.run(zeroshot.parser().parse_args(_flags(tiny)))
    assert res["images"] == len(keep)
    assert set(res["accuracy"]) == {"shape", "colour"}
    for acc in res["accuracy"].values():
        assert set(acc) == {"old/old", "orig-new/new", "new/old", "new/new"}
        assert all(0 <= a <= 100 for a in acc.values())


def test_accuracy_is_top1_against_an_independent_count():
    images = torch.nn.functional.normalize(torch.randn(50, 6), dim=-1)
    classes = torch.nn.functional.normalize(torch.randn(4, 6), dim=-1)
    labels = torch.randint(0, 4, (50,))
    hits = sum(int(max(range(4), key=lambda c: float(images[i] @ classes[c])) == labels[i]) for i in range(50))
    assert zeroshot.accuracy(images, classes, labels) == round(100 * hits / 50, 2)


def test_pair_images_world_keeps_the_other_splits_and_extends_the_pairs(tiny):
    args = quality.parser().parse_args([*_flags(tiny), "--pair-images", "120"])
    data = quality.world_dir(args)
    assert data.name == "world-pairs120"
    base, more = read_pairs(tiny / "world" / "pairs.parquet"), read_pairs(data / "pairs.parquet")
    assert more.n_images == 120 and more.images[:96] == base.images and more.captions[:96] == base.captions
    for name in ("corpus", "eval"):
        assert (data / f"{name}.parquet").read_bytes() == (tiny / "world" / f"{name}.parquet").read_bytes()


def test_ablations_table(tiny):
    args = ablations.parser().parse_args(_flags(tiny))
    configs = ablations.configurations(args)
    assert configs["pairs-x2"][-2:] == ["--pair-images", "192"]  # the tiny world has 96 pair images
    res = ablations.run(ablations.parser().parse_args([*_flags(tiny), "--only", "default", "corpus-1/4", "image-pretrain"]))
    rows = res["ablations"]
    assert list(rows) == ["default", "corpus-1/4", "image-pretrain"]
    assert rows["corpus-1/4"]["corpus"] == rows["default"]["corpus"] // 4
    for row in rows.values():
        assert set(row["new/old"]) == {"t2i", "i2t"} and _in_range({"new/old": row["new/old"], "new/new": row["new/new"]})
        assert row["gate_passed"] == [r["gate"]["passed"] for r in row["runs"]]
    assert rows["default"]["old/old"] == rows["image-pretrain"]["old/old"]  # same gallery, same eval


def test_chain_has_both_links_a_gate_each_and_the_direct_run(tiny):
    res = chain.run(chain.parser().parse_args([*_flags(tiny), "--mid", str(tiny / "mid"), "--work", str(tiny / "chain")]))
    (run,) = res["runs"]
    assert [link["link"] for link in run["links"]] == ["old->mid", "mid->new"]
    for link in [*run["links"], run["direct"]]:
        assert link["gate"]["criterion"] == "eqn2" and isinstance(link["gate"]["passed"], bool)
        assert _in_range(link["recall"])
    assert run["links"][1]["no_regression"]["criterion"] == "no-regression"
    # every link is measured against the same root gallery; link 2's prev/old is link 1's new/old
    assert run["links"][0]["recall"]["t2i"]["old/old"] == run["links"][1]["recall"]["t2i"]["old/old"] \
        == run["direct"]["recall"]["t2i"]["old/old"]
    assert run["links"][1]["recall"]["i2t"]["prev/old"] == run["links"][0]["recall"]["i2t"]["new/old"]
    assert set(run["table"]["t2i"]) == {"old/old", "mid/old", "new/old (chain)", "new/old (direct)"}
    # by default link 2 trains towards the root model, as the direct upgrade does: the same training, run once
    assert run["link2_targets"] == "root" and run["links"][1]["train"]["same_training_as"] == "direct"
    assert all(run["links"][1]["recall"][d]["new/old"] == run["direct"]["recall"][d]["new/old"] for d in ("t2i", "i2t"))
    assert [link["train"]["fit_weight"] for link in (*run["links"], run["direct"])] == [0.0, 0.0, 0.0]

    # zeroshot takes a chain's bundle: the gallery side is its root, the base its new model
    bundle = tiny / "chain" / "seed0" / "link1" / "bundle"
    zs = zeroshot.run(zeroshot.parser().parse_args([*_flags(tiny), "--bundle", str(bundle)]))
    assert (zs["old"], zs["new"]) == (str(tiny / "old"), str(tiny / "mid")) and zs["seed"] is None
    assert all(0 <= a <= 100 for acc in zs["accuracy"].values() for a in acc.values())


def test_image_source_needs_the_pairs_images_and_never_falls_back_to_text(tiny):
    pre, ft = quality.parse_settings([*SMALL[1::2], "pretrain.source=image"])
    pairs = read_pairs(tiny / "world" / "pairs.parquet")
    w_new, w_old = torch.randn(64, 40), torch.randn(64, 24)
    with pytest.raises(ValueError, match="needs the image embeddings"):
        quality.xbt_upgrade(str(tiny / "new"), w_new, w_old, pairs, pre, ft, seed=0)
    # the chain passes each link's pair images: with champion targets link 2's stand-in for v_old is link 1's
    # compatible space, and the fit term is on there, and only there
    res = chain.run(chain.parser().parse_args([*_flags(tiny), "--mid", str(tiny / "mid"), "--work", str(tiny / "chain-img"),
                                               "--set", "pretrain.source=image", "--set", "pretrain.chain_targets=champion"]))
    assert res["pretrain"]["source"] == "image"
    (run,) = res["runs"]
    assert run["link2_targets"] == "champion" and "same_training_as" not in run["links"][1]["train"]
    assert all(isinstance(link["gate"]["passed"], bool) for link in run["links"])
    assert [link["train"]["fit_weight"] for link in (*run["links"], run["direct"])] == [0.0, CHAIN_FIT_WEIGHT, 0.0]
    assert run["links"][1]["recall"]["i2t"]["prev/old"] == run["links"][0]["recall"]["i2t"]["new/old"]


def test_cost_bench_splits_each_methods_time(tiny):
    args = ["--old", str(tiny / "old"), "--new", str(tiny / "new"), "--data", str(tiny / "world"),
            "--methods", "xbt", "base", "--set", "pretrain.epochs=1", "--set", "pretrain.batch_size=64",
            "--set", "finetune.batch_size=32"]
    out = subprocess.run([sys.executable, "bench/cost.py", *args], check=True, capture_output=True, text=True)
    res = json.loads(out.stdout)
    xbt, base = res["rows"]
    assert xbt["pretrain_s"] > 0 and base["pretrain_s"] == 0  # only XBT pretrains φ
    assert xbt["samples"]["corpus_texts"] > 0 and base["samples"]["old_model_images"] > 0
    assert xbt["samples"]["old_model_images"] == 0  # XBT never runs the old image encoder
    assert res["xbt_over_base"] == round(xbt["upgrade_s"] / base["upgrade_s"], 2)


def test_phi_transfer_diagnostics_by_hand():
    from bench.phi_transfer import transfer
    from xbtcore.evaluate import Side

    g = torch.Generator().manual_seed(0)
    caption_image = torch.arange(6).repeat_interleave(2)  # 6 images, 2 captions each
    image = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    text = torch.nn.functional.normalize(image[caption_image] + 0.3 * torch.randn(12, 8, generator=g), dim=-1)
    old = Side(text=text, image=image)
    exact = transfer(old, old, caption_image)  # a φ that lands every image on its own old image
    assert exact["i2i"] == {"1": 100.0, "5": 100.0, "10": 100.0} and exact["i2i_mean_cos"] == pytest.approx(1.0)
    assert exact["image_lands_in_text_region"] == 0.0 and exact["t2t"]["1"] == 100.0
    # a φ that lands each image on its first caption: in the text region, everywhere
    on_caption = Side(text=text, image=text[::2])
    assert transfer(on_caption, old, caption_image)["image_lands_in_text_region"] == 100.0


def test_chain_fit_compares_link2_fit_weights_against_the_root_gallery(tiny):
    res = chain_fit.run(chain_fit.parser().parse_args(
        [*_flags(tiny), "--mid", str(tiny / "mid"), "--link1-pair-weights", "0", "2", "--fit-weights", "0", "10"]))
    assert list(res["old/old"]) == ["1", "5", "10"]
    assert [r["fit_weight"] for r in res["direct"]] == [0.0, 10.0]
    assert [r["pair_weight"] for r in res["link1"]] == [0.0, 2.0]
    for row in res["link1"]:
        assert [r["fit_weight"] for r in row["link2"]] == [0.0, 10.0]
        assert all(0 <= v <= 100 for r in [row, *row["link2"]] for v in r["t2i"].values())
    # the fit term changes φ2, so it changes where its text queries land
    assert res["link1"][1]["link2"][0]["t2i"] != res["link1"][1]["link2"][1]["t2i"] or \
        res["direct"][0]["t2i"] != res["direct"][1]["t2i"]
