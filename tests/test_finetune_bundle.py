"""XBT training (Eqn. 5), baselines (Eqn. 6), the bundle and the on/off property."""

import dataclasses
import json
import shutil

import pytest
import torch
from families import EMBED_DIM, save_tiny_family

from worlds import shapes
from worlds.tinyclip import TinyClipSpec, make_tiny_clip
from xbtcore.adapters import adapters_off, auto_prompt_count, find_prompts
from xbtcore.augment import AugmentConfig
from xbtcore.bundle import BundleMeta, CompatibleEncoder, load_compatible, save_bundle
from xbtcore.data import read_pairs
from xbtcore.encoders import DualEncoder, ModelLoadError
from xbtcore.finetune import FinetuneConfig, finetune, prompt_count
from xbtcore.losses import DivergedError
from xbtcore.methods import get_method
from xbtcore.phi import LinearMap, Phi, PhiConfig

# Augmentation on (off by default) so the resume test also covers its per-row RNG.
FAST = FinetuneConfig(batch_size=32, checkpoint_every=2, augment=AugmentConfig(enabled=True))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    paths = shapes.write_world(root / "world", shapes.WorldSpec(corpus_captions=300, pair_images=96, eval_images=16))
    make_tiny_clip(root / "old", TinyClipSpec(width=32, layers=1, heads=2, embed_dim=24), seed=1)
    make_tiny_clip(root / "new", TinyClipSpec(width=48, layers=1, heads=2, embed_dim=40), seed=2)
    return {
        "root": root,
        "pairs": read_pairs(paths["pairs"]),
        "eval": read_pairs(paths["eval"]),
        "old": str(root / "old"),
        "new": str(root / "new"),
    }


def plan(method: str):
    return get_method(method).plan


def _images(pairs):
    return [pairs.load_image(i) for i in range(pairs.n_images)]


def _new_phi():
    torch.manual_seed(0)
    return Phi(PhiConfig(40, 24))


def test_xbt_trains_only_lora_prompts_and_phi_layernorms(tiny):
    enc = DualEncoder.from_pretrained(tiny["new"])
    base = {n: p.detach().clone() for n, p in enc.model.named_parameters()}
    phi = _new_phi()
    phi_before = {n: p.detach().clone() for n, p in phi.named_parameters()}
    finetune(enc, phi, tiny["pairs"], plan("xbt"), FAST)
    for n, p in phi.named_parameters():
        is_ln = n.startswith("net.1.") or n.startswith("net.4.")
        assert p.requires_grad == is_ln, n
        assert torch.equal(p, phi_before[n]) != is_ln, n  # LNs moved, Linears did not
    lora = [n for n, p in enc.model.named_parameters() if p.requires_grad and "lora_" in n]
    assert lora and any("vision_model" in n for n in lora) and any("text_model" in n for n in lora)
    trainable = {n for n, p in enc.model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or n.endswith("prompts") for n in trainable)
    assert find_prompts(enc.model).prompts.shape == (auto_prompt_count(enc.model), 48)
    # base weights are untouched (peft prefixes names; compare by suffix)
    frozen = {
        n.replace("base_model.model.", "").replace(".base_layer", ""): p
        for n, p in enc.model.named_parameters()
        if not p.requires_grad
    }
    for n, p in base.items():
        key = n.replace("embeddings.", "embeddings.inner.", 1) if "vision_model.embeddings." in n else n
        assert torch.equal(frozen[key], p), n


def test_bf16_autocast_training_keeps_float32_weights_and_follows_the_float32_run(tiny):
    runs = {}
    for precision in ("fp32", "bf16"):
        enc, phi = DualEncoder.from_pretrained(tiny["new"]), _new_phi()
        history = finetune(enc, phi, tiny["pairs"], plan("xbt"), FAST, precision=precision)
        losses = [h["loss"] for h in history if "loss" in h]
        trained = {n: p.detach().clone() for n, p in enc.model.named_parameters() if p.requires_grad}
        assert all(p.dtype == torch.float32 for p in trained.values()) and phi.net[1].weight.dtype == torch.float32
        runs[precision] = losses, trained
    (full, full_w), (half, half_w) = runs["fp32"], runs["bf16"]
    assert full != half and len(full) == len(half)  # bf16 ran: its losses are not float32's to the last bit
    assert half == pytest.approx(full, rel=0.02)  # the same batches and steps, within bf16's rounding
    assert full_w.keys() == half_w.keys() and not all(torch.equal(full_w[n], half_w[n]) for n in full_w)
    with pytest.raises(ValueError, match="precision must be fp32 or bf16, got 'fp16'"):
        finetune(
            DualEncoder.from_pretrained(tiny["new"]), _new_phi(), tiny["pairs"], plan("xbt"), FAST, precision="fp16"
        )


def test_bundle_roundtrip_is_bit_identical_and_off_is_original(tiny, tmp_path):
    ev = tiny["eval"]
    orig = DualEncoder.from_pretrained(tiny["new"])
    orig_t, orig_i = orig.embed_texts(ev.captions), orig.embed_images(_images(ev))

    enc, phi = DualEncoder.from_pretrained(tiny["new"]), _new_phi()
    finetune(enc, phi, tiny["pairs"], plan("xbt"), FAST)
    up = CompatibleEncoder(enc, phi)
    t1, i1 = up.embed_texts(ev.captions), up.embed_images(_images(ev))
    assert t1.shape == (len(ev.captions), 24)
    meta = BundleMeta(
        base_model=tiny["new"],
        old_model=tiny["old"],
        root_model=tiny["old"],
        method="xbt",
        phi=dataclasses.asdict(phi.cfg),
        n_prompts=prompt_count(enc),
    )
    save_bundle(tmp_path / "bundle", enc, phi, meta)
    assert not (tmp_path / "bundle.tmp").exists()
    # peft lists the LoRA modules in a set's order, which changes from process to process: sorted, the same
    # training writes the same bytes (the registry's version key hashes them)
    modules = json.loads((tmp_path / "bundle" / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert len(modules) > 2 and modules == sorted(modules)
    up2, meta2 = load_compatible(tmp_path / "bundle")
    assert meta2 == meta
    assert torch.equal(up2.embed_texts(ev.captions), t1)
    assert torch.equal(up2.embed_images(_images(ev)), i1)
    with adapters_off(up2.encoder.model):
        assert torch.equal(up2.encoder.embed_texts(ev.captions), orig_t)
        assert torch.equal(up2.encoder.embed_images(_images(ev)), orig_i)
    # and on again afterwards
    assert torch.equal(up2.embed_texts(ev.captions), t1)
    # LoRA and the prompts under torch.compile, on bucketed shapes: the same embeddings
    up2.compile_after = 0
    torch.testing.assert_close(up2.embed_texts(ev.captions), t1, atol=1e-5, rtol=0)
    torch.testing.assert_close(up2.embed_images(_images(ev)), i1, atol=1e-5, rtol=0)
    assert set(up2.encoder._compiled_towers) == {"text", "image"} and up2.compile_after == 0

    # A bundle missing a file of its own is named as broken, with the file
    for name in ("phi.safetensors", "prompts.safetensors"):
        broken = tmp_path / f"no-{name}"
        shutil.copytree(tmp_path / "bundle", broken)
        (broken / name).unlink()
        with pytest.raises(ValueError, match=rf"no-{name}: a broken xbt bundle, {name} missing"):
            load_compatible(broken)


def test_bundle_carries_a_local_base_model_and_loads_after_it_moves(tiny, tmp_path):
    import shutil

    ev = tiny["eval"]
    base_dir = tmp_path / "models" / "new"
    shutil.copytree(tiny["new"], base_dir)
    enc, phi = DualEncoder.from_pretrained(str(base_dir)), _new_phi()
    finetune(enc, phi, tiny["pairs"], plan("xbt"), FAST)
    want = CompatibleEncoder(enc, phi).embed_texts(ev.captions)
    meta = BundleMeta(
        base_model=str(base_dir),
        old_model=tiny["old"],
        root_model=tiny["old"],
        method="xbt",
        phi=dataclasses.asdict(phi.cfg),
        n_prompts=prompt_count(enc),
    )
    save_bundle(tmp_path / "bundle", enc, phi, meta)
    weights = tmp_path / "bundle" / "base" / "model.safetensors"
    assert weights.stat().st_ino == (base_dir / "model.safetensors").stat().st_ino  # a hard link, no second copy
    # save_pretrained rewrites the small files in place: the bundle holds copies, so saving a checkpoint again
    # into its folder leaves the bundle as it was trained
    for name in ("config.json", "preprocessor_config.json", "tokenizer_config.json"):
        with open(base_dir / name, "r+") as f:
            config = json.load(f)
            f.seek(0), f.truncate(), json.dump({**config, "edited": True}, f)
    assert not any("edited" in json.loads(f.read_text()) for f in (tmp_path / "bundle" / "base").glob("*.json"))

    linear = torch.linalg.qr(torch.randn(40, 24))[0]  # a fitted-map bundle carries its base the same way
    save_bundle(
        tmp_path / "linear",
        DualEncoder.from_pretrained(str(base_dir)),
        LinearMap.of(linear),
        dataclasses.replace(meta, method="procrustes", n_prompts=0),
    )
    want_linear = load_compatible(tmp_path / "linear")[0].embed_texts(ev.captions)

    shutil.move(base_dir, tmp_path / "moved")  # the checkpoint folder is reorganised after registration
    up, meta2 = load_compatible(tmp_path / "bundle")
    assert meta2.base_model == str(base_dir) and up.encoder.ref == str(base_dir)
    assert torch.equal(up.embed_texts(ev.captions), want)
    assert torch.equal(load_compatible(tmp_path / "linear")[0].embed_texts(ev.captions), want_linear)


def test_full_tune_bundle_is_a_whole_checkpoint(tiny, tmp_path):
    # Full-tune has no adapter: its bundle carries the whole model, tokenizer and image processor included,
    # and loads (bit-identical) with the base model's folder gone.
    import shutil

    from serve.engine import load_query_model
    from tasks.registry import space_of

    ev = tiny["eval"]
    base_dir = tmp_path / "new"
    shutil.copytree(tiny["new"], base_dir)
    enc, phi = DualEncoder.from_pretrained(str(base_dir)), _new_phi()
    targets = (
        torch.nn.functional.normalize(torch.randn(tiny["pairs"].n_images, 24), dim=-1),
        torch.nn.functional.normalize(torch.randn(len(tiny["pairs"].captions), 24), dim=-1),
    )
    finetune(enc, phi, tiny["pairs"], plan("full-tune"), FAST, old_targets=targets)
    up = CompatibleEncoder(enc, phi)
    want_t, want_i = up.embed_texts(ev.captions), up.embed_images(_images(ev))
    meta = BundleMeta(
        base_model=str(base_dir),
        old_model=tiny["old"],
        root_model=tiny["old"],
        method="full-tune",
        phi=dataclasses.asdict(phi.cfg),
    )
    save_bundle(tmp_path / "bundle", enc, phi, meta, full_weights=True)
    # Its own space (a backfill's) is the new model it was tuned from, as that model embeds, not the tuned one.
    own = load_query_model(str(tmp_path / "bundle"))
    assert own.own_space == space_of(str(base_dir))
    assert torch.equal(
        own.own().embed_texts(ev.captions), DualEncoder.from_pretrained(str(base_dir)).embed_texts(ev.captions)
    )
    shutil.rmtree(base_dir)
    up2, _ = load_compatible(tmp_path / "bundle")
    assert torch.equal(up2.embed_texts(ev.captions), want_t)
    assert torch.equal(up2.embed_images(_images(ev)), want_i)
    with pytest.raises(ModelLoadError, match=f"is a full-tune bundle: .* the new model it was tuned from, {base_dir}"):
        load_query_model(str(tmp_path / "bundle")).own()


def _hub_cache(cache, repo_id: str, model_dir) -> None:
    """Lay `model_dir` out as huggingface_hub caches a download: blobs, a snapshot of symlinks, refs/main."""
    import hashlib
    import os
    from pathlib import Path

    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / ("0" * 40)
    for d in (snapshot, repo / "blobs", repo / "refs"):
        d.mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    for f in Path(model_dir).iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        os.symlink(os.path.relpath(blob, snapshot), snapshot / f.name)


def test_bundle_carries_a_hub_cached_base_model_and_loads_after_the_cache_is_cleared(tiny, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    _hub_cache(tmp_path / "hub", "xbt-test/tiny-new", tiny["new"])
    ev = tiny["eval"]
    enc, phi = DualEncoder.from_pretrained("xbt-test/tiny-new"), _new_phi()  # loaded from the cache, offline
    finetune(enc, phi, tiny["pairs"], plan("xbt"), FAST)
    want = CompatibleEncoder(enc, phi).embed_images(_images(ev))
    meta = BundleMeta(
        base_model="xbt-test/tiny-new",
        old_model=tiny["old"],
        root_model=tiny["old"],
        method="xbt",
        phi=dataclasses.asdict(phi.cfg),
        n_prompts=prompt_count(enc),
    )
    save_bundle(tmp_path / "bundle", enc, phi, meta)
    carried = tmp_path / "bundle" / "base" / "model.safetensors"
    assert carried.is_file() and not carried.is_symlink()  # the blob itself, not a link into the cache

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))  # evicted
    with pytest.raises(ModelLoadError, match="xbt-test/tiny-new"):
        DualEncoder.from_pretrained("xbt-test/tiny-new")
    up, meta2 = load_compatible(tmp_path / "bundle")
    assert meta2.base_model == up.encoder.ref == "xbt-test/tiny-new"
    assert torch.equal(up.embed_images(_images(ev)), want)


def test_a_hub_id_outside_the_cache_stays_a_reference(tiny, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    enc, phi = DualEncoder.from_pretrained(tiny["new"]), _new_phi()
    meta = BundleMeta(
        base_model="xbt-test/never-downloaded",
        old_model=tiny["old"],
        root_model=tiny["old"],
        method="xbt",
        phi=dataclasses.asdict(phi.cfg),
    )
    save_bundle(tmp_path / "bundle", enc, phi, meta)
    assert not (tmp_path / "bundle" / "base").exists()


@pytest.mark.parametrize("family", ["blip", "siglip"])
def test_xbt_trains_saves_and_switches_off_on_other_families(family, tiny, tmp_path):
    # LoRA on all linear layers and the soft prompts must fit BLIP retrieval and SigLIP
    # (no CLS token) as they fit CLIP: one default for every family of CONTRACT.md.
    ev = tiny["eval"]
    base_dir = save_tiny_family(family, tmp_path / family)
    orig = DualEncoder.from_pretrained(str(base_dir))
    orig_t, orig_i = orig.embed_texts(ev.captions), orig.embed_images(_images(ev))
    enc = DualEncoder.from_pretrained(str(base_dir))
    torch.manual_seed(0)
    phi = Phi(PhiConfig(EMBED_DIM[family], 24))
    finetune(enc, phi, tiny["pairs"], plan("xbt"), FAST)
    assert prompt_count(enc) >= 1
    with adapters_off(enc.model):
        moved = enc.embed_images(_images(ev))
    assert torch.equal(moved, orig_i)
    assert not torch.equal(enc.embed_images(_images(ev)), orig_i)  # the prompts and LoRA did train
    up = CompatibleEncoder(enc, phi)
    t1, i1 = up.embed_texts(ev.captions), up.embed_images(_images(ev))
    meta = BundleMeta(
        base_model=str(base_dir),
        old_model=tiny["old"],
        root_model=tiny["old"],
        method="xbt",
        phi=dataclasses.asdict(phi.cfg),
        n_prompts=prompt_count(enc),
    )
    save_bundle(tmp_path / "bundle", enc, phi, meta)
    up2, _ = load_compatible(tmp_path / "bundle")
    assert torch.equal(up2.embed_texts(ev.captions), t1) and torch.equal(up2.embed_images(_images(ev)), i1)
    with adapters_off(up2.encoder.model):
        assert torch.equal(up2.encoder.embed_texts(ev.captions), orig_t)
        assert torch.equal(up2.encoder.embed_images(_images(ev)), orig_i)


@pytest.mark.parametrize("method", ["base", "lora-only", "full-tune"])
def test_eqn6_baselines_train_phi_fully(tiny, method):
    pairs = tiny["pairs"]
    enc, phi = DualEncoder.from_pretrained(tiny["new"]), _new_phi()
    targets = (
        torch.nn.functional.normalize(torch.randn(pairs.n_images, 24), dim=-1),
        torch.nn.functional.normalize(torch.randn(len(pairs.captions), 24), dim=-1),
    )
    finetune(enc, phi, pairs, plan(method), FAST, old_targets=targets)
    assert all(p.requires_grad for p in phi.parameters())
    has_prompts = find_prompts(enc.model) is not None
    assert has_prompts == (method == "base")
    if method == "full-tune":
        assert all(p.requires_grad for p in enc.model.parameters())


def test_eqn6_needs_old_targets(tiny):
    with pytest.raises(ValueError, match="old_targets"):
        finetune(DualEncoder.from_pretrained(tiny["new"]), _new_phi(), tiny["pairs"], plan("base"), FAST)


def test_resume_from_checkpoint_equals_uninterrupted_run(tiny, tmp_path):
    ev = tiny["eval"]
    full_enc, full_phi = DualEncoder.from_pretrained(tiny["new"]), _new_phi()
    full_hist = finetune(full_enc, full_phi, tiny["pairs"], plan("xbt"), FAST)
    want = CompatibleEncoder(full_enc, full_phi).embed_texts(ev.captions)

    ckpt = tmp_path / "ckpt.pt"
    calls = {"n": 0}

    def crash(step, loss):
        if step == 2:
            raise KeyboardInterrupt  # killed right after the step-2 checkpoint

    enc, phi = DualEncoder.from_pretrained(tiny["new"]), _new_phi()
    with pytest.raises(KeyboardInterrupt):
        finetune(enc, phi, tiny["pairs"], plan("xbt"), FAST, checkpoint_path=ckpt, on_step=crash)
    assert ckpt.exists()

    def count(step, loss):
        calls["n"] += 1

    enc, phi = DualEncoder.from_pretrained(tiny["new"]), _new_phi()
    hist = finetune(enc, phi, tiny["pairs"], plan("xbt"), FAST, checkpoint_path=ckpt, on_step=count)
    assert [h["resumed_from"] for h in hist if "resumed_from" in h] == [2]
    assert calls["n"] == 3 - 2  # 96 pairs / 32 = 3 steps; only step 3 ran again
    # The loss curve is whole: steps 1-2 come back from the checkpoint, each step once, same losses.
    assert [h["step"] for h in hist if "loss" in h] == [1, 2, 3]
    assert [h["loss"] for h in hist if "loss" in h] == pytest.approx(
        [h["loss"] for h in full_hist if "loss" in h], abs=1e-5
    )
    torch.testing.assert_close(CompatibleEncoder(enc, phi).embed_texts(ev.captions), want, atol=1e-6, rtol=0)


def test_an_unreadable_checkpoint_is_moved_aside_and_the_training_starts_over(tiny, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"PK\x03\x04 not a whole zip archive")
    enc, phi = DualEncoder.from_pretrained(tiny["new"]), _new_phi()
    with pytest.warns(UserWarning, match=r"ckpt\.pt: the training checkpoint does not read .*ckpt\.pt\.unreadable"):
        hist = finetune(enc, phi, tiny["pairs"], plan("xbt"), FAST, checkpoint_path=ckpt)
    assert [h["step"] for h in hist if "loss" in h] == [1, 2, 3] and not any("resumed_from" in h for h in hist)
    assert (tmp_path / "ckpt.pt.unreadable").read_bytes().startswith(b"PK")


def test_nan_loss_stops_the_run(tiny):
    enc, phi = DualEncoder.from_pretrained(tiny["new"]), _new_phi()
    with torch.no_grad():
        phi.net[0].weight.fill_(float("nan"))
    with pytest.raises(DivergedError, match="nan"):
        finetune(enc, phi, tiny["pairs"], plan("xbt"), FAST)


@pytest.mark.parametrize("image_size,patch,expect", [(224, 14, 10), (224, 32, 2), (32, 8, 1), (336, 14, 10)])
def test_auto_prompt_count_keeps_the_papers_share(image_size, patch, expect):
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch,
        ),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
    )
    assert auto_prompt_count(CLIPModel(cfg)) == expect


def test_prompts_are_created_on_the_towers_device(tiny):
    # A model already on an accelerator gets its prompts there too (found on the
    # GPU machine: prompts made on the CPU broke the first cuda training step).
    from xbtcore.adapters import add_vision_prompts

    enc = DualEncoder.from_pretrained(tiny["new"])
    enc.model.to("meta")
    prompts = add_vision_prompts(enc.model, 2)
    assert prompts.prompts.device.type == "meta"


def test_the_soft_prompts_learn_at_100x_the_lr_unless_given_their_own(tiny):
    """Sec. 4.1: prompts at 1e-2 beside 1e-4; a changed lr keeps the ratio, an explicit prompt_lr wins."""
    from xbtcore.finetune import prepare_model

    for cfg, want in (
        (FinetuneConfig(), 1e-2),
        (FinetuneConfig(lr=3e-4), 3e-2),
        (FinetuneConfig(lr=3e-4, prompt_lr=5e-3), 5e-3),
    ):
        groups = prepare_model(DualEncoder.from_pretrained(tiny["new"]), _new_phi(), plan("xbt"), cfg)
        assert [g["lr"] for g in groups] == pytest.approx([cfg.lr, want]), cfg
