"""The xbt-upgrade flow end to end on a tiny world with tiny CLIPs (in-process, temporary Prefect API)."""

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import FAST
from pydantic import ValidationError

from xbtcore.data import ValSplit
from xbtcore.encoders import COMPILE_AFTER_ITEMS

CONTRACT_KEYS = {"method", "old", "new", "recall", "gate", "counts", "timings_s"}
CASES = ["old/old", "new/old", "new/new", "orig-new/new"]
CACHED_STEPS = ["check-inputs", "extract-corpus", "embed-frozen", "fit-head", "train", "evaluate"]

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
        method="xbt",
        **FAST,
    )
    return UpgradeParams(**{**base, **kw})


def _head_history(out: Path) -> dict:
    """The loss history the fit-head step wrote beside the head (its path is in the report's config)."""
    (path,) = (out / "work").glob("head-*.safetensors.history.json")
    return json.loads(path.read_text())


def _t2i_recall(query: torch.Tensor, gallery: torch.Tensor, owner: torch.Tensor, k: int) -> float:
    """Brute force: a caption hits when its own image is among the k most similar."""
    top = (query @ gallery.T).topk(k, dim=1).indices  # (Nc, k)
    return round(100.0 * (top == owner[:, None]).any(1).float().mean().item(), 2)


def test_report_matches_contract_and_rerun_skips_finished_steps(prefect_harness, tiny, tmp_path, monkeypatch):
    # Its own task-result store: other tests run the same inputs, and their
    # cached results would make this "first" run come back Cached.
    monkeypatch.setenv("XBT_STATE_DIR", str(tmp_path / "state"))
    import xbtcore.pretrain
    from flows.upgrade import upgrade
    from tasks.advice import next_steps
    from xbtcore.bundle import load_compatible
    from xbtcore.data import read_pairs
    from xbtcore.encoders import DualEncoder
    from xbtcore.pretrain import PretrainConfig

    saved = []  # φ's checkpoints: one after every step here
    monkeypatch.setattr(xbtcore.pretrain, "CHECKPOINT_SECONDS", 0.0)
    monkeypatch.setattr(xbtcore.pretrain, "save_checkpoint", lambda path, state: saved.append(path))
    out = tmp_path / "run"
    upgrade(_params(tiny, out))
    report = json.loads((out / "report.json").read_text())
    assert CONTRACT_KEYS <= set(report)
    assert saved and all(p.parent == out / "work" and p.name.endswith(".ckpt") for p in saved), saved
    assert not list((out / "work").glob("*.ckpt"))  # φ's and the fine-tune's checkpoints go with their runs
    assert report["method"] == "xbt" and report["old"] == tiny["old"] and report["new"] == tiny["new"]
    for d in ("t2i", "i2t"):
        assert list(report["recall"][d]) == CASES
        assert all(list(r) == ["1", "5", "10", "50"] for r in report["recall"][d].values())
    assert set(report["gate"]) == {"passed", "criterion", "ks", "failures"} and report["gate"]["ks"] == [1, 5, 10]
    assert set(report["timings_s"]) == {"extract", "embed", "pretrain", "train", "validate", "evaluate", "total"}
    gpu = torch.cuda.is_available()  # --device, --precision and --compile auto, settled on this machine
    assert (report["config"]["device"], report["config"]["precision"], report["config"]["compile"]) == (
        ("cuda", "bf16", COMPILE_AFTER_ITEMS) if gpu else ("cpu", "fp32", None)
    )

    # Counts against an independent reading of the inputs.
    corpus = [t for t in pq.read_table(tiny["corpus"]).column("caption").to_pylist() if t and t.strip()]
    ev = pq.read_table(tiny["eval"]).to_pydict()
    pair_ids = pq.read_table(tiny["pairs"]).column("image_id").to_pylist()
    pair_images = len(set(pair_ids))
    val_images = min(max(math.ceil(0.1 * pair_images), 500), pair_images // 2)
    tied = report["eval_images_tied"]
    assert report["counts"] == {
        "corpus": len(set(corpus)),
        "pairs": pq.read_metadata(tiny["pairs"]).num_rows,
        "eval_images": len(set(ev["image_id"])),
        "eval_captions": len(ev["caption"]),
        "val_images": val_images,
        "val_pairs": val_images * len(pair_ids) // pair_images,  # the tiny world: as many captions per image
        "eval_images_in_pairs": 0,  # the tiny world's eval images are not among its pairs
    }

    # new/old t2i recomputed by brute force from the reloaded bundle and the old model.
    evalset = read_pairs(tiny["eval"])
    compat, meta = load_compatible(out / "bundle")
    assert meta.method == "xbt" and meta.root_model == tiny["old"]
    images = [evalset.load_image(i) for i in range(evalset.n_images)]
    old_images = DualEncoder.from_pretrained(tiny["old"]).embed_images(images)
    w_bar = compat.embed_texts(evalset.captions)
    for k in (1, 5, 10):
        assert report["recall"]["t2i"]["new/old"][str(k)] == _t2i_recall(w_bar, old_images, evalset.caption_image, k)
    # the old gallery's images that share an embedding with another, by pairwise distance
    apart = (old_images[:, None] - old_images[None]).abs().amax(-1) + torch.eye(len(old_images))  # (N, N)
    assert set(tied) == {"old/old", "new/new", "orig-new/new"} and tied["old/old"] == int((apart < 1e-4).any(1).sum())

    # Each gate check's margin with its bootstrap interval, matching the recall table.
    for d in ("t2i", "i2t"):
        for k in ("1", "5", "10"):
            m = report["gate_margins"][d][k]
            assert m["margin"] == pytest.approx(
                report["recall"][d]["new/old"][k] - report["recall"][d]["old/old"][k], abs=0.011
            )
            assert m["low"] <= m["margin"] <= m["high"]

    assert report["promotion"]["promoted"] == report["gate"]["passed"]
    curve = report["backfill"]  # a backfill's way from the compatible queries to the new model alone
    gain = json.loads((out / "bundle" / "backfill_order.json").read_text())  # fitted on the validation pairs
    assert gain["fitted_on"]["items"] == val_images and len(gain["weights"]) == 3 + gain["dim"] + 1
    assert curve["order"] == "learned" and list(curve["curves"]) == ["learned", "isolated-first", "random"]
    for k in ("1", "5", "10"):  # numpy here, torch there: a near-tie may fall the other way
        assert curve["curves"][curve["order"]][0][k] == pytest.approx(report["recall"]["t2i"]["new/old"][k], abs=0.1)
        assert curve["curves"]["random"][-1][k] == pytest.approx(report["recall"]["t2i"]["orig-new/new"][k], abs=0.1)
    assert report["next_steps"] == next_steps(report, PretrainConfig())  # what the CLI prints under the verdict
    assert all(report["steps"][s] == "Completed" for s in CACHED_STEPS)
    # The HTML report next to it: the map and 6 example queries (own image + top 5 of each model).
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "Embedding map" in page and page.count('<img class="thumb') == 6 * (1 + 2 * 5)

    upgrade(_params(tiny, out))
    again = json.loads((out / "report.json").read_text())
    assert all(again["steps"][s] == "Cached" for s in CACHED_STEPS)
    assert again["recall"] == report["recall"]
    assert again["promotion"]["version"] == report["promotion"]["version"]  # same bundle, same version


def test_bad_inputs_fail_before_training(prefect_harness, tiny, tmp_path):
    import pyarrow as pa

    from flows.upgrade import upgrade
    from xbtcore.data import InputError

    table = pq.read_table(tiny["pairs"])
    no_caption = tmp_path / "pairs.parquet"
    pq.write_table(table.drop_columns(["caption"]), no_caption)
    out = tmp_path / "run"
    # The parameters check every input as they are built, before the flow (or Prefect) starts.
    with pytest.raises(ValidationError, match=r"pairs\.parquet: missing column 'caption'"):
        upgrade(_params(tiny, out, pairs=str(no_caption)))
    assert not (out / "bundle").exists() and not (out / "work" / "phi.safetensors").exists()

    broken = tmp_path / "eval.parquet"
    ev = pq.read_table(tiny["eval"])
    ids = ev.column("image_id").to_pylist()
    images = [b"\x89PNG not really" if i == ids[0] else im for i, im in zip(ids, ev.column("image").to_pylist())]
    pq.write_table(ev.set_column(ev.schema.get_field_index("image"), "image", pa.array(images, pa.binary())), broken)
    with pytest.raises(ValidationError, match=r"eval\.parquet: column 'image': images do not decode"):
        upgrade(_params(tiny, out, eval=str(broken)))
    assert not (out / "bundle").exists()

    one = tmp_path / "one-image.parquet"
    pq.write_table(table.slice(0, 1), one)  # a validation split needs an image to hold out and one to train on
    with pytest.raises(InputError, match=r"one-image\.parquet: holds 1 distinct image; a validation split"):
        upgrade(_params(tiny, out, pairs=str(one), method="procrustes"))
    assert not (out / "bundle").exists()

    with pytest.raises(ValidationError, match="method"):
        _params(tiny, out, method="magic")
    with pytest.raises(ValidationError, match="no such file or folder"):
        _params(tiny, out, corpus=str(tmp_path / "missing.parquet"))
    with pytest.raises(ValidationError, match="unknown setting 'nope'"):
        _params(tiny, out, pretrain={"nope": 1})
    # a gate at a K the validation margins do not measure would fail only after every candidate trained
    with pytest.raises(ValidationError, match=r"gate K values must be drawn from \[1, 5, 10\], got \[20, 3\]"):
        _params(tiny, out, gate_ks=[20, 3])
    assert _params(tiny, out, gate_ks=[5, 1, 5]).gate_ks == [1, 5]
    with pytest.raises(ValidationError, match="source must be one of"):
        _params(tiny, out, pretrain={"source": "pixels"})
    with pytest.raises(ValidationError, match="chain_targets must be one of root, champion, got 'mid'"):
        _params(tiny, out, pretrain={"chain_targets": "mid"})
    # a word where a number goes is named, not a TypeError from deep inside the config
    with pytest.raises(ValidationError, match="setting 'fit_weight' of PretrainConfig takes a number, got 'ten'"):
        _params(tiny, out, pretrain={"fit_weight": "ten"})
    with pytest.raises(ValidationError, match="setting 'sigma' of PretrainConfig takes a number, got 'x'"):
        _params(tiny, out, pretrain={"sigma": "x"})
    builtin = dict(corpus=None, pairs=None, eval=None)
    with pytest.raises(ValidationError, match="pair_images must be a positive whole number, got 2.5"):
        _params(tiny, out, **builtin, world={"pair_images": 2.5})
    with pytest.raises(ValidationError, match="unknown world settings"):
        _params(tiny, out, **builtin, world={"pairs": 10})


def test_a_corpus_of_fewer_texts_than_the_new_models_width_is_warned_about(
    prefect_harness, tiny, tmp_path, monkeypatch
):
    import flows.upgrade
    from flows.upgrade import upgrade

    warned = _check_inputs_warnings(monkeypatch, "small-corpus", module=flows.upgrade)
    texts = [t for t in pq.read_table(tiny["corpus"]).column("caption").to_pylist() if t and t.strip()]
    small = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"caption": list(dict.fromkeys(texts))[:5]}), small)
    report = upgrade(_params(tiny, tmp_path / "run", corpus=str(small), method="procrustes", val_fraction=0))
    assert report["counts"]["corpus"] == 5
    assert any(w.startswith("the corpus holds 5 distinct texts, fewer than the new model's") for w in warned), warned


def test_a_hub_id_missing_from_the_cache_offline_fails_as_the_parameters_are_built(tiny, tmp_path, monkeypatch):
    from xbtcore.encoders import ModelLoadError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"model 'xbt-test/no-such-model' is not .* in the Hugging Face cache"):
        _params(tiny, tmp_path / "run", new="xbt-test/no-such-model")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert _params(tiny, tmp_path / "run", new="xbt-test/no-such-model").new == "xbt-test/no-such-model"  # online


def test_phi_pretrained_on_text_and_the_pairs_images(prefect_harness, tiny, tmp_path, monkeypatch):
    """pretrain.source=text+image: φ's rows are the distinct corpus texts plus one per pair image."""
    monkeypatch.setenv("XBT_STATE_DIR", str(tmp_path / "state"))
    from flows.upgrade import upgrade
    from xbtcore.data import read_pairs
    from xbtcore.pretrain import PretrainConfig

    out = tmp_path / "run"
    pretrain = {**FAST["pretrain"], "source": "text+image"}
    upgrade(_params(tiny, out, pretrain=pretrain))
    history = _head_history(out)
    corpus = {t for t in pq.read_table(tiny["corpus"]).column("caption").to_pylist() if t and t.strip()}
    rows = len(corpus) + read_pairs(tiny["pairs"]).n_images
    assert history["config"]["pretrain"]["source"] == "text+image"
    epochs = PretrainConfig(**pretrain).epochs_for(rows)
    assert len(history["steps"]) == epochs * (rows // pretrain["batch_size"])  # text alone: fewer
    report = json.loads((out / "report.json").read_text())
    assert report["steps"]["fit-head"] == "Completed" and (out / "bundle").exists()


def test_pair_term_reads_the_pairs_by_the_new_model(prefect_harness, tiny, tmp_path, monkeypatch):
    """pretrain.pair_weight > 0: the embed step caches the pairs by the new model and φ's
    pretraining gets one (v_new, w_new) row per pair caption."""
    monkeypatch.setenv("XBT_STATE_DIR", str(tmp_path / "state"))
    import xbtcore.pretrain
    from flows.upgrade import upgrade
    from xbtcore.data import read_pairs

    seen = {}
    real = xbtcore.pretrain.text_only_pretrain

    def spy(phi, w_new, w_old, cfg, pairs=None, **kw):
        seen.update(weight=cfg.pair_weight, rows=None if pairs is None else [tuple(t.shape) for t in pairs])
        return real(phi, w_new, w_old, cfg, pairs=pairs, **kw)

    monkeypatch.setattr("xbtcore.pretrain.text_only_pretrain", spy)
    out = tmp_path / "run"
    upgrade(_params(tiny, out, pretrain={**FAST["pretrain"], "pair_weight": 1.0, "pair_batch_size": 16}))
    from xbtcore.data import ValSplit, split_pairs

    n = len(split_pairs(read_pairs(tiny["pairs"]), ValSplit(0.1, seed=0))[0].captions)  # the training part's captions
    assert seen == {"weight": 1.0, "rows": [(n, 32), (n, 32)]}  # zoo "new" of the tiny world embeds in 32 dims
    assert _head_history(out)["config"]["pretrain"]["pair_weight"] == 1.0 and (out / "bundle").exists()


def test_diverging_loss_fails_the_run_and_promotes_nothing(prefect_harness, tiny, tmp_path, monkeypatch):
    import xbtcore.pretrain
    from flows.upgrade import upgrade
    from xbtcore.losses import DivergedError

    def nan_loss(mapped, w_old, scale, **terms):
        return (mapped.sum() + w_old.sum()) * float("nan")

    monkeypatch.setattr(xbtcore.pretrain, "eqn3_loss", nan_loss)
    out = tmp_path / "run"
    with pytest.raises(DivergedError, match="pretrain loss became nan"):
        upgrade(_params(tiny, out))
    assert not (out / "report.json").exists() and not (out / "bundle").exists()


def test_an_eval_image_that_fails_to_decode_fails_the_run_naming_it_and_leaves_the_folder_as_it_was(
    prefect_harness, tiny, tmp_path
):
    from test_data import _scrambled_pixels

    from flows.upgrade import upgrade
    from xbtcore.data import InputError

    table = pq.read_table(tiny["eval"])
    images = table.column("image").to_pylist()
    target = next(png for png in images if png != images[0])  # the second image, in all its caption rows
    first = images.index(target)
    # it parses, so the check on reading passes it; decoding fails
    images = [_scrambled_pixels(png) if png == target else png for png in images]
    broken = tmp_path / "eval-broken.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("image"), "image", pa.array(images)), broken)
    expected = rf"eval-broken\.parquet: column 'image': an image does not decode.*\(row {first}\)"
    out = tmp_path / "run"

    def none(flow, flow_run, state):
        pass

    unhooked = upgrade.with_options(on_failure=[none], on_crashed=[none], on_cancellation=[none])  # as SIGKILL
    with pytest.raises(InputError, match=expected):
        unhooked(_params(tiny, out, eval=str(broken), method="procrustes"))
    assert not (out / "report.json").exists() and not (out / "bundle").exists()

    other = tmp_path / "rerun"
    (other / "bundle").mkdir(parents=True)  # a previous run's outputs, which only a finished run replaces
    (other / "bundle" / "xbt_bundle.json").write_text("{}")
    (other / "report.json").write_text("{}")
    with pytest.raises(InputError, match=expected):
        upgrade(_params(tiny, other, eval=str(broken), method="procrustes"))
    assert (other / "report.json").read_text() == "{}" and (other / "bundle" / "xbt_bundle.json").is_file()
    assert not (other / "bundle.tmp").exists()


def test_a_run_that_cannot_record_itself_in_the_catalog_leaves_no_report(prefect_harness, tiny, tmp_path, monkeypatch):
    # a DuckDB session outside xbt holds the catalog past the wait: the run fails before OUT looks finished
    from test_catalog import _hold_open

    import catalog.store
    from flows.upgrade import upgrade
    from tasks.common import state_dir
    from xbtcore.data import InputError

    monkeypatch.setattr(catalog.store, "LOCK_WAIT_S", 0.2)
    out = tmp_path / "run"
    holder = _hold_open(state_dir() / "catalog.duckdb", 120)
    try:
        with pytest.raises(InputError, match=r"catalog\.duckdb: xbt's catalog is held open by another DuckDB session"):
            upgrade(_params(tiny, out, method="procrustes"))
    finally:
        holder.kill()
        holder.wait()
    assert not (out / "report.json").exists() and not (out / "bundle").exists()
    report = upgrade(_params(tiny, out, method="procrustes"))  # the session gone, the same run finishes
    assert (out / "report.json").is_file() and (out / "bundle").is_dir()
    runs = catalog.store.Catalog(state_dir() / "catalog.duckdb").rows("runs")
    assert [(r["report"], r["finished"]) for r in runs if r["out_dir"] == str(out)] == [
        (str(out / "report.json"), True)
    ]
    assert report["gate"]["criterion"] == "eqn2"

    # a run that stops after recording itself (killed while publishing) stays unfinished in the catalog; its
    # rerun is a row of its own, finished
    import flows.upgrade

    publish = flows.upgrade.publish_bundle

    def killed(src, dst, *rest):
        if Path(dst) == tmp_path / "killed" / "bundle":  # into OUT, after the catalog row
            raise RuntimeError("killed while publishing")
        return publish(src, dst, *rest)

    monkeypatch.setattr(flows.upgrade, "publish_bundle", killed)
    with pytest.raises(RuntimeError, match="killed while publishing"):
        upgrade(_params(tiny, tmp_path / "killed", method="procrustes"))
    monkeypatch.undo()
    upgrade(_params(tiny, tmp_path / "killed", method="procrustes"))
    runs = catalog.store.Catalog(state_dir() / "catalog.duckdb").rows("runs")
    assert sorted(r["finished"] for r in runs if r["out_dir"] == str(tmp_path / "killed")) == [False, True]


def test_an_eval_set_drawn_from_the_pairs_is_named_in_the_reports_advice(prefect_harness, tiny, tmp_path):
    from flows.upgrade import upgrade

    report = upgrade(_params(tiny, tmp_path / "run", eval=tiny["pairs"], method="procrustes"))
    shared = report["counts"]["eval_images_in_pairs"]
    assert shared == report["counts"]["eval_images"] > 0
    named = f"{shared} of the {shared} eval images are also in the pairs"
    assert any(line.startswith(named) for line in report["next_steps"]), report["next_steps"]


def test_champion_moves_on_pass_only_and_chains_from_it(prefect_harness, tiny, tmp_path, monkeypatch):
    import tasks.evaluate
    from flows.upgrade import upgrade
    from tasks import registry
    from xbtcore.gate import GateResult

    monkeypatch.setattr(tasks.evaluate, "eqn2_gate", lambda recall, ks: GateResult(passed=True, ks=list(ks)))
    first = upgrade(_params(tiny, tmp_path / "a", seed=11))
    name = first["promotion"]["model"]
    assert first["promotion"]["promoted"]
    c = registry.client()
    assert registry.champion_version(c, name) == first["promotion"]["version"]

    failing = GateResult(passed=False, ks=[1, 5, 10], failures=[["t2i", 1, 1.0, 2.0]])
    monkeypatch.setattr(tasks.evaluate, "eqn2_gate", lambda recall, ks: failing)
    second = upgrade(_params(tiny, tmp_path / "b", seed=12))
    assert not second["promotion"]["promoted"] and "not promoted" in second["promotion"]["reason"]
    assert second["promotion"]["reason"].endswith(f"champion stays version {first['promotion']['version']}")
    assert second["promotion"]["reason"].startswith("gate failed (1 failing Eqn. 2 check):")
    assert second["gate"] == failing.to_dict()
    assert registry.champion_version(c, name) == first["promotion"]["version"]
    assert str(c.get_model_version_by_alias(name, "candidate").version) == second["promotion"]["version"]

    # A chain link: the champion bundle is the old model; the gallery stays the root model's.
    monkeypatch.undo()
    champion = f"models:/{name}@champion"
    third = upgrade(_params(tiny, tmp_path / "c", old=champion, method="procrustes"))
    assert list(third["recall"]["t2i"]) == [*CASES, "prev/old"]
    assert third["no_regression"]["criterion"] == "no-regression"
    assert third["recall"]["t2i"]["old/old"] == first["recall"]["t2i"]["old/old"]
    assert third["promotion"]["model"] == name  # same gallery space, same registered model
    # the alias as given, and the version it named for this run (the alias moves on)
    assert third["old"] == champion and third["resolved"]["old"] == f"models:/{name}/{first['promotion']['version']}"
    assert third["resolved"]["new"] == third["new"]
    assert Path(third["bundle"]).is_dir()
    # The next link into the folder of the link it starts from would replace that link under itself.
    from tasks.common import fingerprint_content

    link = fingerprint_content(third["bundle"])
    with pytest.raises(ValueError, match=r"--old \S+/c/bundle is inside \S+/c/bundle, which this run replaces"):
        upgrade(_params(tiny, tmp_path / "c", old=third["bundle"], method="procrustes"))
    assert fingerprint_content(third["bundle"]) == link and (tmp_path / "c" / "report.json").is_file()

    # What the link trains towards (pretrain.chain_targets). By default the gallery's root model: the link's
    # map is the one a first upgrade from the root fits. With "champion", the champion's compatible space:
    # its corpus was embedded by the champion bundle (a "-compat" cache entry of the corpus' size).
    from tasks.common import cache_dir
    from xbtcore.bundle import load_compatible
    from xbtcore.data import read_pairs

    from_root = upgrade(_params(tiny, tmp_path / "c-root", method="procrustes"))
    towards_champion = upgrade(
        _params(
            tiny,
            tmp_path / "c-champion",
            old=champion,
            method="procrustes",
            pretrain={**FAST["pretrain"], "chain_targets": "champion"},
        )
    )
    captions = read_pairs(tiny["eval"]).captions
    maps = {
        run["bundle"]: load_compatible(run["bundle"])[0].embed_texts(captions)
        for run in (third, from_root, towards_champion)
    }
    torch.testing.assert_close(maps[third["bundle"]], maps[from_root["bundle"]])
    assert not torch.allclose(maps[towards_champion["bundle"]], maps[from_root["bundle"]], atol=1e-3)
    compat = [json.loads(m.read_text()) for m in cache_dir().glob("text-*-compat-*/manifest.json")]
    assert any(m["rows"] == towards_champion["counts"]["corpus"] and m["complete"] for m in compat), compat

    # XBT's φ fits the root's own embeddings with the paper's contrastive loss alone (μ = 0), as a first
    # upgrade does; towards a champion's compatible embeddings it adds the fit term (μ = 10).
    from xbtcore.pretrain import CHAIN_FIT_WEIGHT

    fourth = upgrade(_params(tiny, tmp_path / "d", old=champion))
    assert fourth["method"] == "xbt" and "prev/old" in fourth["recall"]["t2i"]
    upgrade(_params(tiny, tmp_path / "e", old=champion, pretrain={**FAST["pretrain"], "chain_targets": "champion"}))
    fit = {run: _head_history(tmp_path / run)["config"]["pretrain"]["fit_weight"] for run in ("a", "d", "e")}
    assert fit == {"a": 0.0, "d": 0.0, "e": CHAIN_FIT_WEIGHT}


@pytest.mark.parametrize(
    "method, pretrain, needs",
    [
        ("xbt", {"pair_weight": 0}, ["w_new", "w_old"]),
        ("xbt", {"source": "image", "pair_weight": 0}, ["v_new_pairs", "v_old_pairs"]),
        ("xbt", {"source": "text+image", "pair_weight": 0}, ["w_new", "w_old", "v_new_pairs", "v_old_pairs"]),
        ("xbt", {"pair_weight": 1}, ["w_new", "w_old", "v_new_pairs", "w_new_pairs"]),
        ("base", {"pair_weight": 1}, ["v_old_pairs", "w_old_pairs"]),
        ("procrustes", {"source": "image"}, ["w_new", "w_old"]),
    ],
)
def test_embed_step_computes_only_what_the_method_reads(tiny, tmp_path, method, pretrain, needs):
    from tasks.embed import embed_frozen, load_cached
    from xbtcore.config import Settings
    from xbtcore.methods import get_method
    from xbtcore.pretrain import PretrainConfig

    spec = get_method(method)
    assert list(spec.needs(spec.config(Settings(pretrain=PretrainConfig(**pretrain))))) == needs
    cache = tmp_path / "cache"
    keys = embed_frozen.fn(needs, tiny["corpus"], tiny["pairs"], tiny["old"], tiny["new"], str(cache), progress=False)
    assert list(keys) == needs
    assert len(list(cache.rglob("manifest.json"))) == len(needs)  # nothing else was embedded
    rows = {
        "w": pq.read_metadata(tiny["corpus"]).num_rows,  # the extract step's output in the flow; here the raw file
        "v": len(set(pq.read_table(tiny["pairs"]).column("image_id").to_pylist())),
    }
    for name in needs:
        n = pq.read_metadata(tiny["pairs"]).num_rows if name in ("w_old_pairs", "w_new_pairs") else rows[name[0]]
        assert load_cached(str(cache), keys[name]).shape[0] == n, name
    with pytest.raises(ValueError, match="need the pairs"):
        embed_frozen.fn(["v_old_pairs"], tiny["corpus"], None, tiny["old"], tiny["new"], str(cache), progress=False)


@pytest.mark.parametrize(
    "method",
    ["base", "lora-only", "full-tune", "lstsq", "slerp-bc", "xbt-gallery", "xbt-gallery-blend", "xbt-gallery-lora"],
)
def test_every_method_upgrades_end_to_end_and_its_bundle_embeds(prefect_harness, tiny, tmp_path, method):
    # Each baseline through the whole flow, as `xbt upgrade --method M` runs it: Full-tune's bundle once
    # lacked its tokenizer, which only the evaluate step and `xbt embed` noticed.
    from flows.upgrade import upgrade
    from xbtcore.bundle import load_compatible
    from xbtcore.data import read_pairs
    from xbtcore.encoders import DualEncoder

    out = tmp_path / method
    report = upgrade(_params(tiny, out, method=method))
    assert report["method"] == method and json.loads((out / "report.json").read_text())["method"] == method
    # a bundle whose queries run the old encoder (auto keeps one only with --allow-old-encoder) says so
    runs_old = (out / "bundle" / "old").is_dir()
    assert ("queries also run the old encoder" in report["chosen"]["reason"]) == runs_old
    assert runs_old or method != "slerp-bc"
    compat, meta = load_compatible(out / "bundle")
    assert meta.method == method
    captions = read_pairs(tiny["eval"]).captions
    emb = compat.embed_texts(captions)
    assert emb.shape == (len(captions), DualEncoder.from_pretrained(tiny["old"]).embed_dim)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(len(captions)), atol=1e-5)
    if method == "xbt-gallery-blend":  # the old model ships in the bundle exactly when a modality blends
        assert type(compat.phi).__name__ == "BlendHead" and (compat.old is not None) == compat.phi.blends
        assert (out / "bundle" / "old").is_dir() == compat.phi.blends


def test_bf16_frozen_passes_give_the_float32_upgrade_within_tolerance(prefect_harness, tiny, tmp_path, monkeypatch):
    # --precision bf16 on the CPU: the corpus, the pairs and the eval set embedded in bf16 (keyed apart in the
    # cache), the training in float32 weights; XBT's bundle (adapters and prompts) loads and embeds in bf16.
    monkeypatch.setenv("XBT_STATE_DIR", str(tmp_path / "state"))
    from flows.upgrade import upgrade

    full = upgrade(_params(tiny, tmp_path / "fp32", device="cpu", precision="fp32"))
    half = upgrade(_params(tiny, tmp_path / "bf16", device="cpu", precision="bf16"))
    assert (half["config"]["device"], half["config"]["precision"]) == ("cpu", "bf16")
    assert half["steps"]["embed-frozen"] == "Completed"  # not float32's cached embeddings
    for d in ("t2i", "i2t"):
        for case in ("old/old", "orig-new/new", "new/old"):
            for k in ("5", "10"):
                assert half["recall"][d][case][k] == pytest.approx(full["recall"][d][case][k], abs=5.0), (d, case, k)


def test_training_under_torchrun_in_two_processes_gives_the_one_process_bundle(
    prefect_harness, tiny, tmp_path, monkeypatch
):
    # --nproc 2 on the CPU: the flow's train step starts torchrun, two gloo ranks each train on half of every
    # global batch, rank 0 writes the bundle. LoRA dropout off: with it a rank draws other masks than one
    # process does for the same rows (tests/test_ddp.py), a valid but different sample.
    monkeypatch.setenv("XBT_STATE_DIR", str(tmp_path / "state"))
    from safetensors.torch import load_file

    from flows.upgrade import upgrade

    no_dropout = {"finetune": {**FAST["finetune"], "lora.dropout": 0.0}}
    one = upgrade(_params(tiny, tmp_path / "one", device="cpu", nproc=1, **no_dropout))
    two = upgrade(_params(tiny, tmp_path / "two", device="cpu", nproc=2, **no_dropout))
    assert (one["config"]["nproc"], two["config"]["nproc"]) == (1, 2)
    assert two["steps"]["train"] == "Completed"  # trained again, not one process's cached bundle
    files = ["phi.safetensors", "prompts.safetensors", "adapter/adapter_model.safetensors"]
    for name in files:
        want, got = load_file(tmp_path / "one" / "bundle" / name), load_file(tmp_path / "two" / "bundle" / name)
        assert got.keys() == want.keys() and want
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, atol=1e-4, rtol=1e-3, msg=lambda m, k=k, n=name: f"{n} {k}: {m}")
    assert not list((tmp_path / "two" / "work").glob("*.launch.pt"))  # the launch file is removed after
    for d in ("t2i", "i2t"):
        assert two["recall"][d]["new/old"] == pytest.approx(one["recall"][d]["new/old"], abs=1.0)


def test_reruns_never_serve_an_output_that_changed_since(prefect_harness, tiny, tmp_path, monkeypatch):
    # Cached steps return paths in the run folder; a run with other inputs may have overwritten them since.
    import shutil

    from flows.upgrade import upgrade
    from tasks.common import fingerprint_content

    monkeypatch.setenv("XBT_STATE_DIR", str(tmp_path / "state"))
    out = tmp_path / "run"
    first = upgrade(_params(tiny, out))
    bundle = fingerprint_content(out / "bundle")
    other = upgrade(_params(tiny, out, finetune={**FAST["finetune"], "lr": 1e-3}))
    assert fingerprint_content(out / "bundle") != bundle and other["steps"]["train"] == "Completed"
    back = upgrade(_params(tiny, out))  # the first settings again, in the same folder
    assert fingerprint_content(out / "bundle") == bundle and back["recall"] == first["recall"]

    # A corpus edited in place, as many distinct rows as before: everything from the embeddings on is redone.
    corpus = tmp_path / "corpus.parquet"
    shutil.copy(tiny["corpus"], corpus)
    params = dict(corpus=str(corpus), out=str(tmp_path / "edit"))
    upgrade(_params(tiny, **params))
    table = pq.read_table(corpus)
    reversed_text = [t[::-1] for t in table.column("caption").to_pylist()]
    pq.write_table(
        table.set_column(table.schema.get_field_index("caption"), "caption", pa.array(reversed_text)), corpus
    )
    edited = upgrade(_params(tiny, **params))
    assert all(edited["steps"][s] == "Completed" for s in ("embed-frozen", "fit-head", "train", "evaluate"))


def _check_inputs_warnings(monkeypatch, name: str, level: int = 30, module=None) -> list[str]:
    """The warnings (with level=logging.INFO, also the notes) check_inputs (or `module`'s log()) logs from now
    on, in the returned list."""
    import logging

    import tasks.evaluate

    warned = []

    class Keep(logging.Handler):
        def emit(self, record):
            if record.levelno >= level:
                warned.append(record.getMessage())

    logger = logging.getLogger(f"xbt.test-{name}")
    logger.setLevel(level)
    logger.addHandler(Keep())
    logger.propagate = False
    monkeypatch.setattr(module or tasks.evaluate, "log", lambda: logger)  # the run log, whatever Prefect's setup
    return warned


def test_a_small_eval_set_is_warned_about_before_any_training(tiny, tmp_path, monkeypatch):
    import tasks.evaluate

    warned = _check_inputs_warnings(monkeypatch, "small-eval", level=20)
    counts = tasks.evaluate.check_inputs.fn(tiny["old"], tiny["new"], tiny["pairs"], tiny["eval"], ValSplit())
    assert counts["eval_images"] == 24 and counts["images"]["eval"]["in_pairs"] == 0
    assert not any("shares" in w or "same model" in w or "repeat" in w for w in warned)
    counts = tasks.evaluate.check_inputs.fn(tiny["old"], tiny["new"], tiny["pairs"], tiny["pairs"], ValSplit())
    assert counts["images"]["eval"]["in_pairs"] == counts["pair_images"]
    assert any(w.startswith(f"--eval shares {counts['pair_images']} of its") for w in warned), warned
    assert any(w.startswith("--eval has 24 images") for w in warned)
    assert any(w.startswith("the validation split has 48 images") for w in warned)
    tasks.evaluate.check_inputs.fn(tiny["old"], tiny["old"], tiny["pairs"], tiny["eval"], ValSplit())
    assert any(w.startswith(f"--old {tiny['old']} and --new {tiny['old']} are the same model") for w in warned)

    # Without image_id every row is its own image: the rows of one image's captions are then copies.
    unnamed = tmp_path / "eval-without-ids.parquet"
    table = pq.read_table(tiny["eval"])
    pq.write_table(table.drop(["image_id"]), unnamed)
    counts = tasks.evaluate.check_inputs.fn(tiny["old"], tiny["new"], tiny["pairs"], str(unnamed), ValSplit())
    copies = table.num_rows - 24  # 24 distinct images
    assert counts["eval_images"] == table.num_rows
    repeat = f"--eval has no image_id column and {copies} of its {table.num_rows} rows repeat an earlier row's image"
    assert any(w.startswith(repeat) for w in warned), warned
    held = "the validation split holds 48 of the 96 pair images, not --val-fraction 0.1 of them: it takes at most half"
    assert any(w.startswith(held) and "(its 500-image floor needs 1000 pair images)" in w for w in warned), warned


def test_a_gallery_of_another_model_or_of_none_of_the_pairs_ids_fails_before_training(tiny, tmp_path):
    import tasks.evaluate
    from flows.upgrade import UpgradeParams
    from xbtcore.data import InputError, read_pairs, write_embeddings_parquet

    ids = read_pairs(tiny["pairs"]).image_ids
    vectors = torch.nn.functional.normalize(torch.randn(len(ids), 24), dim=-1)  # the tiny old model's 24-d space
    elsewhere = write_embeddings_parquet(tmp_path / "other-ids.parquet", vectors, ids=[f"zz{i}" for i in ids])
    args = (tiny["old"], tiny["new"], tiny["pairs"], tiny["eval"], ValSplit())
    none_held = r"other-ids\.parquet: column 'id': holds none of the image_id values of --pairs .*'zz"
    with pytest.raises(InputError, match=none_held):
        tasks.evaluate.check_inputs.fn(*args, gallery=str(elsewhere))
    flags = dict(old=tiny["old"], new=tiny["new"], corpus=tiny["corpus"], pairs=tiny["pairs"], eval=tiny["eval"])
    with pytest.raises(ValueError, match=none_held):  # in the CLI's seconds, before Prefect starts
        UpgradeParams(**flags, out=str(tmp_path / "out"), gallery=str(elsewhere))
    pairs_only = write_embeddings_parquet(tmp_path / "pairs-only.parquet", vectors, ids=ids)  # no eval image_id
    assert not set(map(str, read_pairs(tiny["eval"]).image_ids)) & set(map(str, ids))
    UpgradeParams(**flags, out=str(tmp_path / "out"), gallery=str(pairs_only))
    with pytest.raises(
        ValueError,
        match=r"pairs-only\.parquet: column 'id': holds none of the image_id values of --eval .*leave out "
        r"--eval-in-gallery: the old image tower then embeds the eval images",
    ):
        UpgradeParams(**flags, out=str(tmp_path / "out"), gallery=str(pairs_only), eval_in_gallery=True)
    nulls = write_embeddings_parquet(tmp_path / "null-id.parquet", vectors[:3], ids=[ids[0], None, ids[2]])
    with pytest.raises(InputError, match=r"null-id\.parquet: column 'id': null ids \(row 1\)"):
        tasks.evaluate.check_inputs.fn(*args, gallery=str(nulls))
    wide = write_embeddings_parquet(tmp_path / "wide.parquet", torch.randn(4, 32), ids=ids[:4])
    with pytest.raises(InputError, match=r"wide\.parquet: column 'embedding': holds 32-d embeddings.* in 24-d"):
        tasks.evaluate.check_inputs.fn(*args, gallery=str(wide))

    # As wide as the old model's, but the catalog records it as another model's (or as text): refused, both named.
    from catalog import Catalog
    from tasks.common import state_dir

    held = write_embeddings_parquet(tmp_path / "held.parquet", vectors, ids=ids)
    catalog = Catalog(state_dir() / "catalog.duckdb")
    catalog.record_gallery(str(held.absolute()), "zoo/other", "other-0123abcd", "image", len(ids), 24)
    with pytest.raises(InputError, match=r"held\.parquet: was embedded by zoo/other \(space other-0123abcd\).*"):
        tasks.evaluate.check_inputs.fn(*args, gallery=str(held))
    catalog.record_gallery(str(held.absolute()), tiny["old"], "any", "text", len(ids), 24)
    with pytest.raises(InputError, match=r"held\.parquet: holds text embeddings"):
        tasks.evaluate.check_inputs.fn(*args, gallery=str(held))
    catalog.record_gallery(str(held.absolute()), tiny["old"], "any", "image", len(ids) + 1, 24)  # another file since
    counts = tasks.evaluate.check_inputs.fn(*args, gallery=str(held))
    assert counts["images"]["train"]["in_gallery"] == counts["images"]["train"]["images"]


def test_a_gallery_whose_ids_name_other_images_is_warned_about_before_training(tiny, tmp_path, monkeypatch):
    # A gallery keyed by other ids than the pairs' image_id (a COCO file's caption `id`, say) trains towards
    # other images' embeddings: the old model's own captions tell it, with no old image tower run.
    from conftest import REPO

    import tasks.evaluate
    from xbtcore.data import Gallery, read_pairs, write_embeddings_parquet
    from xbtcore.encoders import DualEncoder

    old = DualEncoder.from_pretrained(str(REPO / "zoo" / "old"))  # trained on this world's kind of images
    pairs = read_pairs(tiny["pairs"])
    images = old.embed_images([pairs.load_image(i) for i in range(pairs.n_images)])
    fits = write_embeddings_parquet(tmp_path / "fits.parquet", images, ids=pairs.image_ids)
    shifted = write_embeddings_parquet(
        tmp_path / "shifted.parquet", images, ids=pairs.image_ids[1:] + pairs.image_ids[:1]
    )
    recall, chance, n = tasks.evaluate.gallery_fit(Gallery(str(fits)), old, pairs)
    assert n == pairs.n_images and recall > 3 * chance
    recall, chance, _ = tasks.evaluate.gallery_fit(Gallery(str(shifted)), old, pairs)
    assert recall <= 3 * chance
    warned = _check_inputs_warnings(monkeypatch, "gallery-fit")
    for gallery in (fits, shifted):
        args = (str(REPO / "zoo" / "old"), tiny["new"], tiny["pairs"], tiny["eval"], ValSplit())
        tasks.evaluate.check_inputs.fn(*args, gallery=str(gallery))
    assert (
        [w for w in warned if "no better than chance" in w]
        == [w for w in warned if "shifted.parquet: the old model's captions of 48 validation images" in w]
        != []
    )
