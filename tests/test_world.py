"""The built-in world: deterministic, CONTRACT-shaped, neither trivial nor degenerate."""

import io
import re

import pyarrow.parquet as pq
import pytest
from PIL import Image

from worlds import shapes

SMALL = shapes.WorldSpec(seed=3, corpus_captions=500, pair_images=30, eval_images=12)


def test_same_seed_same_bytes(tmp_path):
    a = shapes.write_world(tmp_path / "a", SMALL)
    b = shapes.write_world(tmp_path / "b", SMALL)
    for name in ("corpus", "pairs", "eval"):
        assert pq.read_table(a[name]).equals(pq.read_table(b[name])), name


def test_other_seed_differs(tmp_path):
    a = shapes.write_world(tmp_path / "a", SMALL)
    b = shapes.write_world(
        tmp_path / "b", shapes.WorldSpec(seed=4, corpus_captions=500, pair_images=30, eval_images=12)
    )
    assert not pq.read_table(a["eval"]).equals(pq.read_table(b["eval"]))


def test_contract_columns_and_counts(tmp_path):
    p = shapes.write_world(tmp_path, SMALL)
    corpus, pairs, ev = (pq.read_table(p[k]) for k in ("corpus", "pairs", "eval"))
    assert corpus.column_names == ["caption"] and corpus.num_rows == 500
    assert ev.column_names == ["image", "caption", "image_id"]
    assert ev.num_rows == 12 * SMALL.captions_per_eval_image
    assert len(set(ev["image_id"].to_pylist())) == 12
    img = Image.open(io.BytesIO(ev["image"][0].as_py()))
    assert img.format == "PNG" and img.size == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)


def test_splits_are_disjoint_streams():
    # corpus, pairs and eval come from different seed streams: no shared caption sequence
    ev = [c for _, cs in shapes.scenes_with_captions(0, "eval", 50, 1) for c in cs]
    pr = [c for _, cs in shapes.scenes_with_captions(0, "pairs", 50, 1) for c in cs]
    assert ev != pr


def _assert_names_every_object(scene, cap: str) -> None:
    for obj in scene.objects:
        assert obj.colour in cap
        assert any(name in cap for name in shapes.SHAPES[obj.shape])


def test_captions_name_every_object():
    import random

    rng = random.Random(0)
    for _ in range(200):
        scene = shapes.sample_scene(rng)
        _assert_names_every_object(scene, shapes.caption_scene(scene, rng))


def test_full_size_meets_issue_minimums():
    spec = shapes.WorldSpec()
    distinct = len(set(shapes.corpus_captions(spec.seed, spec.corpus_captions)))
    assert distinct >= 200_000, distinct  # what survives exact-duplicate removal
    assert spec.eval_images >= 1000
    assert distinct > 5 * spec.pair_images * spec.captions_per_pair_image  # corpus far larger than pairs


def test_parallel_rendering_gives_the_serial_bytes():
    items = shapes.scenes_with_captions(0, "pairs", 2_000, 1)
    parallel = shapes._encoded_images(items, "pairs", 0)
    serial = [shapes.png_bytes(img) for img in shapes.render_split(items, "pairs", 0)]
    assert parallel == serial


def test_user_phrasing_names_every_object_in_zoo_words_only():
    import random
    import re

    from worlds.tinyclip import world_vocabulary

    vocab = set(world_vocabulary())
    rng = random.Random(1)
    for _ in range(300):
        scene = shapes.sample_scene(rng)
        cap = shapes._user_caption(scene, rng)
        _assert_names_every_object(scene, cap)
        assert set(re.findall(r"\w+|[,:]", cap)) <= vocab, cap  # no <unk>: the zoo's tokenizer knows every word


def test_user_phrasing_share_and_default_is_the_zoo_style():
    base = shapes.scenes_with_captions(0, "eval", 300, 2)
    assert shapes.scenes_with_captions(0, "eval", 300, 2, user_phrasing=0.0) == base  # 0 draws nothing extra
    zoo_style = {c for _, cs in base for c in cs}
    mixed = [c for _, cs in shapes.scenes_with_captions(0, "eval", 300, 2, user_phrasing=0.5) for c in cs]
    # the user's word orders: "there is" after a place or relation, or a shape name before its colour
    user = [
        c
        for c in mixed
        if re.search(
            r"^(in|at|on|left|right|above|below) .* there is|^("
            + "|".join(n for names in shapes.SHAPES.values() for n in names)
            + r") ("
            + "|".join(shapes.COLOURS)
            + ")",
            c,
        )
    ]
    assert 0.25 < len(user) / len(mixed) < 0.75, len(user) / len(mixed)
    assert not any(c in zoo_style for c in user)


@pytest.mark.parametrize(
    "bad, needle",
    [
        (dict(pair_images=2.5), "pair_images must be a positive whole number, got 2.5"),
        (dict(eval_images=0), "eval_images must be a positive whole number"),
        (dict(seed=-1), "seed must be a non-negative whole number"),
        (dict(corpus_captions=True), "corpus_captions must be a positive whole number"),
        (dict(user_phrasing=1.5), "user_phrasing must be a share in [0, 1]"),
    ],
)
def test_bad_sizes_fail_when_the_spec_is_made(bad, needle):
    with pytest.raises(ValueError) as err:
        shapes.WorldSpec(**bad)
    assert needle in str(err.value)
    shapes.WorldSpec(user_phrasing=1)  # an int share is a share


def test_plain_words_keeps_the_first_k_synonyms_and_nothing_else_changes():
    caption = "a tiny red round dot left of a huge blue hex and a green plus sign, a hexagon in the top"
    assert (
        shapes.plain_words(caption, 1)
        == "a small red circle left of a large blue hexagon and a green cross, a hexagon in the top"
    )
    assert (
        shapes.plain_words(caption, 2)
        == "a small red circle left of a large blue hex and a green plus sign, a hexagon in the top"
    )
    assert shapes.plain_words(caption, 3) == caption
    with pytest.raises(ValueError, match="known_synonyms"):
        shapes.plain_words(caption, 0)


def test_plain_words_per_kind_leaves_the_other_kind_alone():
    caption = "a tiny red round dot left of a huge blue hex"
    assert shapes.plain_words(caption, {"size": 2}) == "a small red round dot left of a large blue hex"
    assert shapes.plain_words(caption, {"shape": 1}) == "a tiny red circle left of a huge blue hexagon"
    assert shapes.plain_words(caption, {"shape": 2, "size": 2}) == shapes.plain_words(caption, 2)
    with pytest.raises(ValueError, match="colour"):
        shapes.plain_words(caption, {"colour": 1})
    with pytest.raises(ValueError, match="at least 1.*size"):
        shapes.plain_words(caption, {"size": 0})
