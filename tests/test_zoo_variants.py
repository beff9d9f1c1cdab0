"""Variants of the demo zoo (scripts/build_zoo.py --spec / --steps / --zoo-user-phrasing / --known-synonyms)."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from worlds import shapes
from worlds.tinyclip import TinyClipSpec, build_clip
from xbtcore.encoders import DualEncoder

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO / "zoo"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import build_zoo  # noqa: E402


def test_text_tower_takes_its_own_width_and_depth():
    spec = TinyClipSpec(width=32, layers=2, heads=2, embed_dim=16, text_width=16, text_layers=1)
    cfg = build_clip(spec, vocab_size=50).config
    assert (cfg.text_config.hidden_size, cfg.text_config.num_hidden_layers) == (16, 1)
    assert (cfg.vision_config.hidden_size, cfg.vision_config.num_hidden_layers) == (32, 2)
    same = build_clip(TinyClipSpec(width=32, layers=2, heads=2, embed_dim=16), vocab_size=50).config
    assert (same.text_config.hidden_size, same.text_config.num_hidden_layers) == (32, 2)
    with pytest.raises(AssertionError, match="text_width"):
        TinyClipSpec(width=32, heads=2, text_width=15)


def test_spec_overrides_are_checked_against_the_spec():
    assert build_zoo.parse_spec(["text_width=32", "text_layers=1"]) == {"text_width": 32, "text_layers": 1}
    assert build_zoo.parse_spec([]) == {}
    for bad in ("text_width", "colour=3", "image_size=big"):
        with pytest.raises(SystemExit, match="FIELD=INTEGER"):
            build_zoo.parse_spec([bad])


def test_variant_tier_trains_on_house_style_captions_with_its_overrides(tmp_path, monkeypatch):
    drawn = []
    real = shapes.scenes_with_captions

    def spy(seed, split, n, c, user_phrasing=0.0):
        drawn.append((split, user_phrasing))
        return real(seed, split, n, c, user_phrasing)

    monkeypatch.setattr(build_zoo.shapes, "scenes_with_captions", spy)
    monkeypatch.setattr(build_zoo, "TRAIN_IMAGES", 48)
    monkeypatch.setattr(build_zoo, "BATCH", 16)
    meta = build_zoo.train_tier(
        "old",
        tmp_path,
        seed=0,
        eval_every=1,
        spec_overrides={"text_width": 32, "text_layers": 1},
        steps=2,
        zoo_user_phrasing=0.5,
    )
    assert ("zoo", 0.5) in drawn and ("eval", 0.0) in drawn  # the eval split keeps the world's own phrasing
    assert meta["steps"] == 2 and meta["zoo_user_phrasing"] == 0.5
    assert meta["spec"]["text_width"] == 32 and meta["spec"]["width"] == build_zoo.TIERS["old"]["spec"].width
    saved = json.loads((tmp_path / "old" / "xbt_zoo.json").read_text())
    assert saved == meta
    enc = DualEncoder.from_pretrained(str(tmp_path / "old"))  # the product's loader reads the variant
    assert enc.model.config.text_config.hidden_size == 32
    w = enc.embed_texts(["a red circle"])
    assert w.shape == (1, build_zoo.TIERS["old"]["spec"].embed_dim) and torch.allclose(w.norm(dim=-1), torch.ones(1))


def test_each_generation_reads_more_words_and_the_committed_zoo_records_it(tmp_path, monkeypatch):
    """old's training captions use only the two commonest words for each shape and size; mid's
    every shape word but only the two commonest size words; new reads every word. The committed
    zoo's metadata says so."""
    seen = {}
    real = shapes.plain_words

    def spy(caption, known):
        seen.setdefault(json.dumps(known), []).append(real(caption, known))
        return seen[json.dumps(known)][-1]

    def rare(words):  # the words a caption uses beyond the first two of each group
        return {w for group in words.values() for w in group[2:]}

    def uses(captions, words):
        return any(re.search(rf"\b{w}\b", c) for c in captions for w in words)

    monkeypatch.setattr(build_zoo.shapes, "plain_words", spy)
    monkeypatch.setattr(build_zoo, "TRAIN_IMAGES", 48)
    monkeypatch.setattr(build_zoo, "BATCH", 16)
    build_zoo.train_tier("old", tmp_path, seed=0, eval_every=1, steps=1)
    assert list(seen) == ["2"] and len(seen["2"]) == 48 * build_zoo.CAPTIONS_PER_IMAGE
    assert not uses(seen["2"], rare(shapes.SHAPES) | rare(shapes.SIZES))
    seen.clear()
    build_zoo.train_tier("mid", tmp_path, seed=0, eval_every=1, steps=1)
    (mid,) = seen.values()
    assert list(seen) == ['{"size": 2}'] and not uses(mid, rare(shapes.SIZES)) and uses(mid, rare(shapes.SHAPES))
    seen.clear()
    build_zoo.train_tier("new", tmp_path, seed=0, eval_every=1, steps=1)
    assert seen == {}
    meta = {
        t: json.loads((ZOO / t / "xbt_zoo.json").read_text()).get("known_synonyms")
        for t in ("old", "mid", "new", "old-same-text")
    }
    assert meta == {"old": 2, "mid": {"size": 2}, "new": None, "old-same-text": None}


def test_known_synonyms_flag_takes_one_k_or_k_per_kind_and_names_a_bad_one():
    assert build_zoo.parse_known_synonyms("2") == 2
    assert build_zoo.parse_known_synonyms("size=2") == {"size": 2}
    assert build_zoo.parse_known_synonyms("shape=1, size=2") == {"shape": 1, "size": 2}
    for bad, says in (("colour=2", "colour"), ("size", "KIND=K"), ("size=x", "KIND=K"), ("0", "at least 1")):
        with pytest.raises(ValueError, match=says):
            build_zoo.parse_known_synonyms(bad)
