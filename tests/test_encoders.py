"""DualEncoder: loading, feature access per family, batching invariances."""

import time
import weakref

import pytest
import torch
from families import EMBED_DIM, save_tiny_family, tiny_family_model

from worlds import shapes
from worlds.tinyclip import TinyClipSpec, make_tiny_clip, save_checkpoint
from xbtcore.cache import cache_model_key
from xbtcore.encoders import (
    COMPILE_AFTER_ITEMS,
    LENGTH_STEP,
    DualEncoder,
    ModelLoadError,
    resolve_compile,
    resolve_device,
    resolve_precision,
)

SPEC = TinyClipSpec(width=32, layers=1, heads=2, embed_dim=16)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip"), SPEC, seed=0)


@pytest.fixture(scope="module")
def enc(clip_dir):
    return DualEncoder.from_pretrained(str(clip_dir))


@pytest.fixture(scope="module")
def texts():
    # Lengths vary a lot, so length-sorted batches differ in padding.
    return shapes.corpus_captions(seed=0, n=18) + ["star", "a"]


@pytest.fixture(scope="module")
def images():
    return [
        shapes.render_scene(s, noise_seed=i) for i, (s, _) in enumerate(shapes.scenes_with_captions(0, "eval", 6, 1))
    ]


def test_embed_texts_is_normalised_and_order_preserving(enc, texts):
    emb = enc.embed_texts(texts, batch_size=4)
    assert emb.shape == (len(texts), enc.embed_dim) == (len(texts), SPEC.embed_dim)
    assert emb.dtype == torch.float32 and emb.device.type == "cpu"
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(len(texts)))
    perm = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
    torch.testing.assert_close(enc.embed_texts([texts[i] for i in perm], batch_size=4), emb[perm], atol=1e-5, rtol=0)
    # Different texts give different embeddings (the test above cannot pass by collapse).
    assert (emb @ emb.T).fill_diagonal_(0).max() < 0.9999


def test_dynamic_padding_matches_one_text_at_a_time(enc, texts):
    batched = enc.embed_texts(texts, batch_size=7)
    alone = torch.cat([enc.embed_texts([t]) for t in texts])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)


def test_features_match_the_model_forward(enc, texts, images):
    # Independent path: CLIPModel.forward with the tokenizer's own padding.
    tok = enc.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = enc.model(**tok, pixel_values=enc.preprocess_images(images))
    torch.testing.assert_close(enc.embed_texts(texts), out.text_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(enc.embed_images(images), out.image_embeds, atol=1e-5, rtol=0)


def _byte_level_bpe(corpus: list[str]):
    """A subword tokenizer trained here (byte-level BPE, as CLIP's): merges cut words into pieces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def test_long_texts_are_tokenized_from_a_prefix_to_the_same_tokens(enc, texts, monkeypatch):
    from xbtcore.encoders import CHARS_PER_TOKEN, clip_long_texts

    words = " ".join(texts).split()
    long = [
        " ".join(words * 400),  # whole words: cut
        "\t".join(words * 400) + "  \n tail",  # other white space
        "x" * 50_000 + " " + " ".join(words),  # no white space before the limit: whole
        " " * 20_000 + " ".join(words * 10),  # a prefix of white space holds no token: whole
        "unknownword! " * 5_000,  # words outside the vocabulary and punctuation
        texts[0],  # short: as it is
    ]
    for tokenizer in (enc.tokenizer, _byte_level_bpe(texts)):
        m = enc.max_text_length
        clipped = clip_long_texts(tokenizer, long, m)
        assert clipped[0] != long[0] and clipped[1] != long[1] and clipped[4] != long[4]
        assert clipped[2] == long[2] and clipped[5] == long[5]
        # white space is no token to the word-level tokenizer (whole) and a token to byte-level BPE (cut)
        assert (clipped[3] == long[3]) == (tokenizer is enc.tokenizer)
        assert all(len(c) <= CHARS_PER_TOKEN * m for c in (clipped[0], clipped[1], clipped[4]))
        assert (
            tokenizer(clipped, truncation=True, max_length=m)["input_ids"]
            == (tokenizer(long, truncation=True, max_length=m)["input_ids"])
        )
    seen = []
    calls = type(enc.tokenizer).__call__

    def spy(self, batch, *a, **kw):
        seen.extend([batch] if isinstance(batch, str) else batch)
        return calls(self, batch, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(type(enc.tokenizer), "__call__", spy)
        embedded = enc.embed_texts(long[:2])
        enc.tokenize(long[:2])
    assert max(len(t) for t in seen) <= CHARS_PER_TOKEN * enc.max_text_length  # the whole text never tokenized
    torch.testing.assert_close(embedded[0], enc.embed_texts([" ".join(words[:200])])[0])  # the same 1st tokens


def test_embed_images_shape_norm_and_batching(enc, images):
    emb = enc.embed_images(images, batch_size=4, progress=True)
    assert emb.shape == (len(images), SPEC.embed_dim) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(len(images)))
    torch.testing.assert_close(enc.embed_images(images, batch_size=1), emb, atol=1e-5, rtol=0)
    assert enc.preprocess_images(images[:2]).shape == (2, 3, SPEC.image_size, SPEC.image_size)


def test_transparent_pixels_are_white_as_the_models_own_image_processor_makes_them(enc, images):
    # A gallery embedded by transformers' own pipeline composites transparency onto white: the same pixels here.
    import numpy as np
    from PIL import Image

    rgb = np.asarray(images[0].convert("RGB"))
    alpha = np.tile(np.linspace(0, 255, rgb.shape[1], dtype=np.uint8), (rgb.shape[0], 1))  # clear to opaque
    rgba = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    for image in (rgba, rgba.convert("LA"), rgba.convert("PA")):
        torch.testing.assert_close(
            enc.preprocess_images([image]), enc.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        )
    assert not torch.equal(enc.preprocess_images([rgba]), enc.preprocess_images([rgba.convert("RGB")]))


def test_a_batch_of_images_is_decoded_a_few_at_a_time(enc, images, monkeypatch):
    # Full-size photos are the memory peak: a batch of 256 decodes DECODE_CHUNK at a time, to the same embeddings.
    from xbtcore import encoders

    class Lazy:  # decodes on access, as a PairSet's images do; counts the decoded images still referenced
        def __init__(self, n):
            self.n, self.alive, self.most = n, 0, 0

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            self.alive += 1
            self.most = max(self.most, self.alive)
            image = images[i % len(images)].copy()
            weakref.finalize(image, self._freed)
            return image

        def _freed(self):
            self.alive -= 1

    lazy = Lazy(40)
    emb = enc.embed_images(lazy, batch_size=256)
    assert lazy.most <= encoders.DECODE_CHUNK
    torch.testing.assert_close(emb, enc.embed_images([images[i % len(images)] for i in range(40)], batch_size=1))


def test_features_are_differentiable_and_unnormalised(enc, texts, images):
    tok = enc.tokenize(texts[:3])
    t = enc.text_features(tok["input_ids"], tok["attention_mask"])
    v = enc.image_features(enc.preprocess_images(images[:3]))
    assert t.shape == v.shape == (3, SPEC.embed_dim)
    assert not torch.allclose(t.norm(dim=1), torch.ones(3))
    (t.sum() + v.sum()).backward()
    assert enc.model.text_projection.weight.grad is not None
    assert enc.model.visual_projection.weight.grad is not None
    enc.model.zero_grad(set_to_none=True)


def test_save_load_round_trip(enc, texts, images, tmp_path):
    save_checkpoint(enc.model, enc.tokenizer, enc.image_processor, tmp_path / "copy")
    again = DualEncoder.from_pretrained(str(tmp_path / "copy"))
    assert torch.equal(again.embed_texts(texts), enc.embed_texts(texts))
    assert torch.equal(again.embed_images(images), enc.embed_images(images))


def test_given_model_is_used(enc, clip_dir):
    other = DualEncoder.from_pretrained(str(clip_dir), model=enc.model)
    assert other.model is enc.model and other.ref == str(clip_dir)


@pytest.mark.parametrize("family", ["blip", "siglip"])
def test_other_families_match_their_own_forward(family, texts, images, tmp_path):
    save_tiny_family(family, tmp_path)
    enc = DualEncoder.from_pretrained(str(tmp_path))
    assert type(enc.model).__name__ == type(tiny_family_model(family)).__name__  # BLIP: not AutoModel's BlipModel
    t, v = enc.embed_texts(texts, batch_size=4), enc.embed_images(images)
    assert t.shape[1] == v.shape[1] == enc.embed_dim == EMBED_DIM[family]
    pixels = enc.preprocess_images(images)
    with torch.no_grad():
        if family == "blip":
            tok = enc.tokenizer(texts, padding=True, return_tensors="pt")
            scores = enc.model(**tok, pixel_values=pixels, use_itm_head=False).itm_score  # (images, texts) cosine
            torch.testing.assert_close(v @ t.T, scores, atol=1e-5, rtol=0)
        else:
            # SigLIP pools the last position: it must see full-length padding.
            tok = enc.tokenizer(texts, padding="max_length", max_length=SPEC.max_text_len, return_tensors="pt")
            out = enc.model(**tok, pixel_values=pixels)
            torch.testing.assert_close(t, out.text_embeds, atol=1e-5, rtol=0)
            torch.testing.assert_close(v, out.image_embeds, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "family, why",
    [("siglip2", "is SigLIP 2, whose image tower takes patches at each image's own resolution"),
     ("bert", r"\(bert\) is not a dual encoder with text and image features")],
)  # fmt: skip
def test_a_model_without_the_image_and_text_features_xbt_reads_is_refused_naming_it(family, why, tmp_path):
    save_tiny_family(family, tmp_path)
    with pytest.raises(ModelLoadError, match=f"model '{tmp_path}' {why}.*: pass a CLIP, SigLIP or BLIP retrieval"):
        DualEncoder.from_pretrained(str(tmp_path))


def test_offline_hub_id_fails_fast_with_the_name(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError) as err:
        DualEncoder.from_pretrained("xbt-test/no-such-model")
    assert time.perf_counter() - t0 < 10
    msg = str(err.value)
    assert "'xbt-test/no-such-model'" in msg and "HF_HUB_OFFLINE" in msg and "\n" not in msg


def test_unreachable_or_unknown_hub_id_is_a_model_load_error(monkeypatch):
    # No offline flag: here the hub is unreachable (one probe, no retries); where it
    # is reachable the id does not exist. Either way a ModelLoadError, quickly.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError, match="xbt-test/no-such-model"):
        DualEncoder.from_pretrained("xbt-test/no-such-model")
    assert time.perf_counter() - t0 < 25


def test_incomplete_or_missing_directories(clip_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json") as err:
        DualEncoder.from_pretrained(str(tmp_path / "empty"))
    assert str(tmp_path / "empty") in str(err.value)

    (tmp_path / "no_weights").mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "no_weights" / name).write_bytes((clip_dir / name).read_bytes())
    with pytest.raises(ModelLoadError, match="no weights"):
        DualEncoder.from_pretrained(str(tmp_path / "no_weights"))

    with pytest.raises(ModelLoadError, match="does not exist"):
        DualEncoder.from_pretrained(str(tmp_path / "nowhere"))

    # transformers 5 would build an empty tokenizer here without a word of warning.
    (tmp_path / "partial").mkdir()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "partial" / name).write_bytes((clip_dir / name).read_bytes())
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        DualEncoder.from_pretrained(str(tmp_path / "partial"))
    (tmp_path / "partial" / "tokenizer_config.json").write_bytes((clip_dir / "tokenizer_config.json").read_bytes())
    (tmp_path / "partial" / "tokenizer.json").write_bytes((clip_dir / "tokenizer.json").read_bytes())
    with pytest.raises(ModelLoadError, match="cannot load the image processor"):
        DualEncoder.from_pretrained(str(tmp_path / "partial"))

    # A tokenizer without a pad token cannot batch captions: say so and where, at load.
    import json
    import shutil

    shutil.copytree(clip_dir, tmp_path / "nopad")
    cfg = json.loads((tmp_path / "nopad" / "tokenizer_config.json").read_text())
    (tmp_path / "nopad" / "tokenizer_config.json").write_text(json.dumps({**cfg, "pad_token": None}))
    with pytest.raises(ModelLoadError, match=r"nopad.*no pad token"):
        DualEncoder.from_pretrained(str(tmp_path / "nopad"))


def test_bf16_passes_on_the_cpu_match_float32_within_bf16_tolerance(enc, clip_dir, texts, images):
    half = DualEncoder.from_pretrained(str(clip_dir), dtype=torch.bfloat16)
    for name, items in (("embed_texts", texts), ("embed_images", images)):
        full, low = getattr(enc, name)(items, batch_size=4), getattr(half, name)(items, batch_size=4)
        assert low.dtype == torch.float32 and low.device.type == "cpu"  # the same output contract
        torch.testing.assert_close(low.norm(dim=1), torch.ones(len(items)))
        cos = (full * low).sum(1)
        assert cos.min() > 0.99 and not torch.equal(full, low), name  # bf16 ran, and stayed close
    assert cache_model_key(half) == cache_model_key(enc) + "-bf16"  # never mixed with float32 entries


def test_compiled_passes_meet_few_shapes_and_equal_the_plain_ones(enc, clip_dir, texts, images):
    # Batches of 7 over 20 texts: three length buckets of LENGTH_STEP tokens, a last batch of 6 rows padded to 7
    # (the cap); images: 4 + 2 rows. Each shape compiles once, and a second pass compiles nothing.
    compiled = DualEncoder.from_pretrained(str(clip_dir))
    compiled.compile_after = 0
    lengths = sorted((len(ids) for ids in enc.tokenizer(texts)["input_ids"]), reverse=True)
    buckets = {min(-(-lengths[i] // LENGTH_STEP) * LENGTH_STEP, enc.max_text_length) for i in range(0, 20, 7)}
    assert len(buckets) >= 2  # the texts span several buckets, so padding past a batch's longest text is exercised
    stats = torch._dynamo.utils.counters["stats"]
    graphs = stats["unique_graphs"]
    t, v = compiled.embed_texts(texts, batch_size=7), compiled.embed_images(images, batch_size=4)
    assert 0 < stats["unique_graphs"] - graphs <= len(buckets) + 2 and compiled.compile_after == 0
    graphs = stats["unique_graphs"]
    again = compiled.embed_texts(texts, batch_size=7)
    assert stats["unique_graphs"] == graphs  # same shapes: nothing recompiles
    torch.testing.assert_close(t, enc.embed_texts(texts, batch_size=7), atol=1e-5, rtol=0)
    torch.testing.assert_close(again, t, atol=0, rtol=0)
    torch.testing.assert_close(v, enc.embed_images(images, batch_size=4), atol=1e-5, rtol=0)
    # Two texts of other lengths in one bucket, as batches of one and two rows: one new shape between them.
    by_length = {len(ids): text for ids, text in zip(enc.tokenizer(texts)["input_ids"], texts)}
    bucket_of = {n: min(-(-n // LENGTH_STEP) * LENGTH_STEP, enc.max_text_length) for n in by_length}
    same = max(([n for n in by_length if bucket_of[n] == b] for b in set(bucket_of.values())), key=len)
    assert len(same) >= 2
    graphs = stats["unique_graphs"]
    compiled.embed_texts([by_length[same[0]]] * 2, batch_size=2)
    compiled.embed_texts([by_length[same[1]], by_length[same[0]]], batch_size=2)
    assert stats["unique_graphs"] - graphs == 1


def test_a_tower_that_cannot_compile_warns_and_embeds_without(enc, clip_dir, texts, monkeypatch):
    def broken(fn, **kw):
        def run(*a):
            raise RuntimeError("InductorError: no C++ compiler\nsecond line")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    other = DualEncoder.from_pretrained(str(clip_dir))
    other.compile_after = 0
    failed = "torch.compile of .*'s text tower failed here .*no C.. compiler.*--compile off"
    with pytest.warns(UserWarning, match=failed):
        out = other.embed_texts(texts, batch_size=7)
    assert other.compile_after is None
    torch.testing.assert_close(out, enc.embed_texts(texts, batch_size=7), atol=1e-5, rtol=0)


def test_compile_settles_by_device_and_pass_size_or_names_the_choices(clip_dir, texts):
    assert resolve_compile("auto", "cuda:0") == COMPILE_AFTER_ITEMS and resolve_compile("auto", "cpu") is None
    assert resolve_compile("on", "cpu") == 0 and resolve_compile("off", "cuda") is None
    assert resolve_compile(COMPILE_AFTER_ITEMS, "cpu") == COMPILE_AFTER_ITEMS  # settled values pass through
    for bad in ("yes", True, -1):
        with pytest.raises(ValueError, match=f"compile {bad!r} is not one of auto, on, off"):
            resolve_compile(bad, "cpu")
    # Passes embed plain until the encoder has embedded compile_after items, then compiled.
    enc = DualEncoder.from_pretrained(str(clip_dir))
    enc.compile_after = len(texts) + 1
    enc.embed_texts(texts, batch_size=7)
    enc.embed_texts(texts[:1])
    assert enc.embedded == len(texts) + 1 and not enc._compiled_towers
    enc.embed_texts(texts, batch_size=7)
    assert set(enc._compiled_towers) == {"text"}


def test_device_and_precision_settle_or_name_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="'cuda'.*sees no CUDA GPU.*use cpu or auto"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="'tpu' is not a device: use auto"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="'meta' is not supported"):
        resolve_device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda:0") == "cuda:0"
    with pytest.raises(ValueError, match="'cuda:1'.*has 1 CUDA GPU"):
        resolve_device("cuda:1")
    assert resolve_precision("auto", "cuda:0") == "bf16" and resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="'fp16' is not one of auto, fp32, bf16"):
        resolve_precision("fp16", "cpu")


def test_training_processes_settle_or_name_the_fix(monkeypatch):
    from xbtcore.ddp import resolve_nproc

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert resolve_nproc("auto", "cpu") == 1 and resolve_nproc("2", "cpu") == 2  # gloo ranks share the cores
    with pytest.raises(ValueError, match="nproc 3: this machine has 2 CPU core.*--nproc 2 or fewer"):
        resolve_nproc(3, "cpu")  # each rank holds the models: past a rank per core they only add memory
    assert resolve_nproc("auto", "cuda") == 4  # one per GPU
    assert resolve_nproc("auto", "cuda:1") == 1  # a named GPU is one process
    with pytest.raises(ValueError, match="names one: pass --device cuda .* or --nproc 1"):
        resolve_nproc(2, "cuda:1")
    with pytest.raises(ValueError, match="nproc 8: this machine has 4 CUDA GPU"):
        resolve_nproc(8, "cuda")
    with pytest.raises(ValueError, match="'two' is not a number: use auto"):
        resolve_nproc("two", "cpu")
    with pytest.raises(ValueError, match="at least one process"):
        resolve_nproc(0, "cpu")


def test_progress_bars_show_on_a_terminal_only(monkeypatch):
    """A bar on a terminal; none in a log file or a Prefect worker's log (stderr not a TTY), nor with
    --no-progress."""
    import io
    import sys

    from xbtcore.encoders import _progress
    from xbtcore.finetune import _progress_bar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream, shown in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        for bar in (_progress(10, "embed texts", True), _progress_bar(10, 0, "train", True)):
            bar.update(10)
            bar.close()
        assert ("embed texts" in stream.getvalue(), "train" in stream.getvalue()) == (shown, shown), stream.getvalue()
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert _progress(10, "embed texts", False).disable and _progress_bar(10, 0, "train", False) is None
