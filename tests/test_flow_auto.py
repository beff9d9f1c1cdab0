"""--method auto, the validation split and the stored gallery, through the whole flow on a tiny world."""

import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import FAST, REPO, upgrade_args

pytestmark = pytest.mark.slow


def _params(tiny, out, **kw):
    from flows.upgrade import UpgradeParams

    base = dict(
        old=tiny["old"],
        new=tiny["new"],
        corpus=tiny["corpus"],
        pairs=tiny["pairs"],
        eval=tiny["eval"],
        out=str(out),
        progress=False,
        **FAST,
    )
    return UpgradeParams(**{**base, **kw})


def test_auto_runs_the_portfolio_cheapest_first_and_keeps_one_chosen_on_validation(prefect_harness, tiny, tmp_path):
    from safetensors.torch import load_file

    from flows.upgrade import upgrade
    from xbtcore.bundle import read_meta
    from xbtcore.methods import by_cost
    from xbtcore.methods.select import choose

    report = upgrade(_params(tiny, tmp_path / "auto"))
    portfolio = [m.name for m in by_cost() if m.portfolio]
    assert [c["method"] for c in report["candidates"]] == portfolio
    assert report["chosen"] == choose(report["candidates"])
    assert report["method"] == report["chosen"]["method"] == read_meta(tmp_path / "auto" / "bundle").method
    old_encoder = {c["method"]: c for c in report["candidates"] if c["old_encoder_at_query"]}
    assert old_encoder and all(not c["eligible"] and c["ran"] for c in old_encoder.values())  # reported, not chosen
    # a candidate whose queries blend with the old model's says by how much, per direction
    assert all(set(c["alpha"]) == {"t2i", "i2t"} for c in old_encoder.values())
    assert not any("alpha" in c for c in report["candidates"] if not c["old_encoder_at_query"])
    for c in report["candidates"]:
        if c["ran"]:  # validation recall of every case and the gate margins with intervals
            assert set(c["recall"]["t2i"]) == {"old/old", "new/old", "new/new", "orig-new/new"}
            assert {"margin", "low", "high"} <= set(c["margins"]["i2t"]["1"]) and c["seconds"] > 0
    assert report["counts"]["val_images"] == 48  # half the 96 pair images: fewer than 500 to spare
    # xbt-gallery-lora starts from xbt-gallery's φ: it is fitted once, under xbt-gallery's name; the blend fits its own
    work = tmp_path / "auto" / "work"
    for owner in ("xbt-gallery", "xbt-gallery-blend"):
        heads = [p for p in work.iterdir() if re.fullmatch(rf"head-{owner}-[0-9a-f]+\.safetensors", p.name)]
        assert len(heads) == 1, (owner, heads)
    (blend,) = work.glob("bundle-xbt-gallery-blend-*[0-9a-f]")
    text_alpha, image_alpha = load_file(blend / "phi.safetensors")["alpha"].tolist()  # text, then image queries
    assert old_encoder["xbt-gallery-blend"]["alpha"] == {"t2i": round(text_alpha, 4), "i2t": round(image_alpha, 4)}
    assert report["timings_s"]["validate"] > 0 and report["timings_s"]["total"] >= sum(
        v for k, v in report["timings_s"].items() if k != "total"
    )


def test_the_bundle_is_the_same_whatever_eval_holds(prefect_harness, tiny, tmp_path):
    from flows.upgrade import upgrade
    from tasks.common import fingerprint_content

    other_eval = tmp_path / "eval.parquet"
    table = pq.read_table(tiny["eval"])
    pq.write_table(table.slice(0, table.num_rows // 2), other_eval)
    a = upgrade(_params(tiny, tmp_path / "a", method="xbt"))
    b = upgrade(_params(tiny, tmp_path / "b", method="xbt", eval=str(other_eval)))
    assert a["counts"]["eval_captions"] != b["counts"]["eval_captions"]
    assert fingerprint_content(a["bundle"]) == fingerprint_content(b["bundle"])


def _xbt(*args, state: Path) -> subprocess.CompletedProcess:
    env = {"XBT_STATE_DIR": str(state), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def test_with_the_stored_gallery_the_old_image_tower_embeds_the_eval_set_unless_it_is_in_the_gallery(tiny, tmp_path):
    # The user's gallery: the old model's embeddings of every pair and eval image, as `xbt embed` writes them.
    both = tmp_path / "images.parquet"
    tables = [pq.read_table(tiny[k], columns=["image", "image_id"]) for k in ("pairs", "eval")]
    import pyarrow as pa

    pq.write_table(pa.concat_tables(tables), both)
    # An eval set numbered like the pairs (its ids are its own): the gallery's embeddings under those ids are
    # other images', which must not stand in for its old side.
    evalset = pq.read_table(tiny["eval"])
    pair_ids = list(dict.fromkeys(pq.read_table(tiny["pairs"], columns=["image_id"]).column(0).to_pylist()))
    renumber = {i: pair_ids[n] for n, i in enumerate(dict.fromkeys(evalset.column("image_id").to_pylist()))}
    ids = pa.array([renumber[i] for i in evalset.column("image_id").to_pylist()])
    colliding = tmp_path / "eval_numbered_like_the_pairs.parquet"
    pq.write_table(evalset.set_column(evalset.schema.get_field_index("image_id"), "image_id", ids), colliding)
    r = _xbt(
        "embed",
        "--model",
        tiny["old"],
        "--input",
        both,
        "--modality",
        "image",
        "--out",
        tmp_path / "gallery.parquet",
        state=tmp_path / "state",
    )
    assert r.returncode == 0, r.stderr
    common = ["--set", "finetune.batch_size=32"]
    r = _xbt(
        *upgrade_args(
            {**tiny, "eval": colliding}, tmp_path / "with", method="base", gallery=tmp_path / "gallery.parquet"
        ),
        *common,
        state=tmp_path / "state",
    )
    assert r.returncode == 0, r.stderr
    with_gallery = json.loads((tmp_path / "with" / "report.json").read_text())
    # the pairs' old images all come from the gallery; the eval set's ids are its own, so the old model embeds it
    assert with_gallery["old_image_tower"]["images"] == 24
    assert with_gallery["old_image_tower"]["from_gallery"] == 96  # train + val pairs
    r = _xbt(*upgrade_args(tiny, tmp_path / "without", method="base"), *common, state=tmp_path / "state2")
    assert r.returncode == 0, r.stderr
    without = json.loads((tmp_path / "without" / "report.json").read_text())
    assert without["old_image_tower"]["images"] == 96 + 24
    # An eval set whose ids are the gallery's too, said so: the old image tower embeds no image at all
    r = _xbt(
        *upgrade_args(tiny, tmp_path / "all", method="base", gallery=tmp_path / "gallery.parquet"),
        "--eval-in-gallery",
        *common,
        state=tmp_path / "state",
    )
    assert r.returncode == 0, r.stderr
    all_in = json.loads((tmp_path / "all" / "report.json").read_text())
    assert all_in["old_image_tower"] == {
        "images": 0,
        "by_part": {"eval": 0, "val": 0, "train": 0},
        "from_gallery": 120,
    }
    for d in ("t2i", "i2t"):  # the same old embeddings, read instead of computed: the same recall
        for case in ("old/old", "new/old"):
            for k, v in without["recall"][d][case].items():
                assert with_gallery["recall"][d][case][k] == pytest.approx(v, abs=0.01), (d, case, k)
                assert all_in["recall"][d][case][k] == pytest.approx(v, abs=0.01), (d, case, k)
    r = _xbt(*upgrade_args(tiny, tmp_path / "none", method="base"), "--eval-in-gallery", state=tmp_path / "state")
    assert r.returncode == 1 and "--eval-in-gallery reads the eval images' old embeddings from --gallery" in r.stderr


def test_report_recall_equals_a_recompute_from_xbt_embed_in_shuffled_batches(tiny, tmp_path):
    # Identical captions embedded in different batches differ by float noise; the tie rule keeps recall exact.
    r = _xbt(*upgrade_args(tiny, tmp_path / "run", method="procrustes"), state=tmp_path / "state")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    table = pq.read_table(tiny["eval"])
    order = list(range(table.num_rows))
    random.Random(0).shuffle(order)
    shuffled = tmp_path / "eval-shuffled.parquet"
    pq.write_table(table.take(order), shuffled)

    def embed(model, modality):
        out = tmp_path / f"{Path(str(model)).name}-{modality}.parquet"
        res = _xbt(
            "embed",
            "--model",
            model,
            "--input",
            shuffled,
            "--modality",
            modality,
            "--out",
            out,
            "--batch-size",
            "7",
            state=tmp_path / "state",
        )
        assert res.returncode == 0, res.stderr
        emb = torch.tensor(pq.read_table(out).column("embedding").to_pylist())
        return emb[torch.argsort(torch.tensor(order))]  # back to the file's row order

    from xbtcore.data import read_pairs
    from xbtcore.evaluate import Side, cross_recall

    ev = read_pairs(tiny["eval"])
    first_row = [ev.caption_image.tolist().index(i) for i in range(ev.n_images)]  # one row per distinct image
    old_t, old_i = embed(tiny["old"], "text"), embed(tiny["old"], "image")[first_row]
    new_t, new_i = embed(tmp_path / "run" / "bundle", "text"), embed(tmp_path / "run" / "bundle", "image")[first_row]
    old, new = Side(text=old_t, image=old_i), Side(text=new_t, image=new_i)
    for case, (query, gallery) in {"old/old": (old, old), "new/old": (new, old)}.items():
        got = cross_recall(query, gallery, ev.caption_image)
        for d in ("t2i", "i2t"):
            for k, v in report["recall"][d][case].items():
                assert got[d][k] == pytest.approx(v, abs=0.1), (case, d, k)
    shutil.rmtree(tmp_path / "state", ignore_errors=True)
