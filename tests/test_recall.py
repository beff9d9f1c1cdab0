"""recall_at_k against brute force, faiss and answers worked out by hand."""

import math

import pytest
import torch

from xbtcore.recall import KS, group_captions, recall_at_k, recall_at_k_reference


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


@pytest.fixture(scope="module")
def pairs():
    """Images with 1 to 5 captions each (shuffled rows), captions noisy copies of their image.

    text_emb comes from a different "model" (a rotation) than image_emb, as in new/old.
    """
    g = torch.Generator().manual_seed(0)
    n_images, dim = 157, 24
    counts = torch.tensor([1, 5, 2, 1, 3, 4, 5, 1])[torch.arange(n_images) % 8]
    caption_image = torch.repeat_interleave(torch.arange(n_images), counts)
    caption_image = caption_image[torch.randperm(len(caption_image), generator=g)]
    image = unit(torch.randn(n_images, dim, generator=g))
    text = unit(image[caption_image] + 0.8 * torch.randn(len(caption_image), dim, generator=g))
    return text, image, caption_image


def test_fixture_has_uneven_caption_counts(pairs):
    _, image, caption_image = pairs
    counts = torch.bincount(caption_image, minlength=len(image))
    assert counts.min() == 1 and counts.max() == 5
    assert len(caption_image) % 7 and len(image) % 7


# Every K up to 60: equal recall at all of them means equal rank histograms.
FINE_KS = tuple(range(1, 61))


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 10_000])
def test_chunked_torch_matches_brute_force(pairs, chunk_size):
    text, image, caption_image = pairs
    got = recall_at_k(text, image, caption_image, ks=FINE_KS, chunk_size=chunk_size)
    assert got == recall_at_k_reference(text, image, caption_image, ks=FINE_KS)


def test_faiss_matches_torch_and_brute_force(pairs):
    text, image, caption_image = pairs
    ref = recall_at_k_reference(text, image, caption_image, ks=FINE_KS)
    assert recall_at_k(text, image, caption_image, ks=FINE_KS, backend="faiss") == ref
    assert recall_at_k(text, image, caption_image, ks=FINE_KS, chunk_size=13) == ref


def test_recall_is_neither_trivial_nor_hopeless(pairs):
    # the agreement tests above would be vacuous at 0% or 100% everywhere
    for direction in recall_at_k(*pairs).values():
        assert 0 < direction["1"] < direction["50"] < 100


def test_default_keys_and_rounding(pairs):
    got = recall_at_k(*pairs)
    assert set(got) == {"t2i", "i2t"}
    for direction in got.values():
        assert list(direction) == [str(k) for k in KS]
        assert all(round(v, 2) == v for v in direction.values())


def test_one_direction(pairs):
    assert set(recall_at_k(*pairs, directions=("i2t",))) == {"i2t"}


def at(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_hand_worked_example(backend):
    # Unit vectors on a circle: a score is the cosine of the angle between them.
    # Images at 0, 90, 180 degrees; captions at 10 and 200 (image 0), 80 (image 1), 260 (image 2).
    image = torch.tensor([at(0), at(90), at(180)])
    text = torch.tensor([at(10), at(200), at(80), at(260)])
    caption_image = torch.tensor([0, 0, 1, 2])
    got = recall_at_k(text, image, caption_image, ks=(1, 2, 3), chunk_size=3, backend=backend)
    # t2i: caption at 200 is 160 deg from image 0, behind 180 (20 deg) and 90 (110 deg): rank 2;
    # the others are nearest their own image. Ranks 0, 2, 0, 0.
    assert got["t2i"] == {"1": 75.0, "2": 75.0, "3": 100.0}
    # i2t: image 0 finds its caption at 10 first (any caption counts); image 1 its caption at 80;
    # image 2's caption at 260 (80 deg) is behind image 0's caption at 200 (20 deg). Ranks 0, 0, 1.
    assert got["i2t"] == {"1": 66.67, "2": 100.0, "3": 100.0}


def test_ties_resolve_for_the_query():
    # Two identical images, each with an identical caption: every own item ties for first.
    image = torch.tensor([at(0), at(0), at(90)])
    text = torch.tensor([at(5), at(5), at(90)])
    got = recall_at_k(text, image, torch.tensor([0, 1, 2]), ks=(1,))
    assert got == {"t2i": {"1": 100.0}, "i2t": {"1": 100.0}}


def test_group_captions_int_ids():
    caption_image, ids = group_captions([7, 3, 7, 9, 3])
    assert caption_image.tolist() == [0, 1, 0, 2, 1]
    assert caption_image.dtype == torch.long
    assert ids == [7, 3, 9]


def test_group_captions_str_ids():
    caption_image, ids = group_captions(["b", "a", "b", "c"])
    assert caption_image.tolist() == [0, 1, 0, 2]
    assert ids == ["b", "a", "c"]


def test_group_captions_without_ids():
    caption_image, ids = group_captions(None, n_rows=3)
    assert caption_image.tolist() == [0, 1, 2]
    assert ids == [0, 1, 2]
    with pytest.raises(ValueError, match="n_rows"):
        group_captions(None)


def test_group_captions_null_id():
    with pytest.raises(ValueError, match=r"null at rows \[1\]"):
        group_captions(["a", None, "b"])


def test_user_errors():
    image = unit(torch.randn(3, 4))
    text = unit(torch.randn(4, 4))
    with pytest.raises(ValueError, match="empty"):
        recall_at_k(text[:0], image, torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="0..3 but there are 3 images"):
        recall_at_k(text, image, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"images \[2\] have no caption"):
        recall_at_k(text, image, torch.tensor([0, 1, 1, 0]))
    # a caption-less image is fine as a t2i distractor
    assert set(recall_at_k(text, image, torch.tensor([0, 1, 1, 0]), directions=["t2i"])) == {"t2i"}
    with pytest.raises(ValueError, match="backend"):
        recall_at_k(text, image, torch.tensor([0, 1, 2, 0]), backend="annoy")
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(text * float("nan"), image, torch.tensor([0, 1, 2, 0]))


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_accepts_grad_and_float64_inputs(pairs, backend):
    text, image, caption_image = pairs
    expected = recall_at_k(text, image, caption_image, backend=backend)
    got = recall_at_k(text.clone().requires_grad_(), image.double(), caption_image, backend=backend)
    assert got == expected


def test_a_near_tie_does_not_outrank_the_own_item_and_a_clear_lead_does():
    from xbtcore.recall import TIE_TOLERANCE

    # one caption query, two images: the other image scores above the own one by d
    def t2i_r1(d: float) -> float:
        own = unit(torch.tensor([[1.0, 0.0]]))
        cos = 0.5
        other_cos = cos + d
        image = torch.tensor([[cos, math.sqrt(1 - cos**2)], [other_cos, math.sqrt(1 - other_cos**2)]])
        return recall_at_k(own, image, torch.tensor([0]), ks=(1,), directions=("t2i",))["t2i"]["1"]

    assert t2i_r1(0.4 * TIE_TOLERANCE) == 100.0  # float noise between batches: still a hit
    assert t2i_r1(3 * TIE_TOLERANCE) == 0.0  # a real lead outranks


def test_identical_captions_embedded_apart_do_not_outrank_each_other():
    # i2t: image 0 owns caption 0; caption 1 (image 1's) is the same text, embedded in another batch
    g = torch.Generator().manual_seed(0)
    image = unit(torch.randn(2, 16, generator=g))
    caption = unit(image[0] + 0.1 * torch.randn(16, generator=g))
    noisy = unit(caption + 1e-7 * torch.randn(16, generator=g))  # the same caption, other float noise
    text = torch.stack([caption, noisy])
    r = recall_at_k(text, image, torch.tensor([0, 1]), ks=(1,), directions=("i2t",))
    assert r["i2t"]["1"] >= 50.0  # image 0 finds its caption first whichever copy scores a hair higher
    copies = recall_at_k(torch.stack([noisy, caption]), image, torch.tensor([0, 1]), ks=(1,), directions=("i2t",))
    assert r == copies  # the order the copies were embedded in does not matter


def test_an_image_with_most_of_the_captions_costs_one_pair_per_caption_and_ranks_as_brute_force():
    """i2t's own items are (image, caption) pairs, as many as captions: one image holding 2,000 of 2,400
    captions must not widen every image's row of own captions to 2,000 (that grew as images x captions)."""
    from xbtcore.recall import _own_items

    g = torch.Generator().manual_seed(3)
    n_images, dim = 401, 16
    caption_image = torch.cat([torch.zeros(2000, dtype=torch.long), torch.arange(1, n_images)])
    caption_image = caption_image[torch.randperm(len(caption_image), generator=g)]
    image = unit(torch.randn(n_images, dim, generator=g))
    text = unit(image[caption_image] + 0.9 * torch.randn(len(caption_image), dim, generator=g))
    owner, item = _own_items(caption_image, "i2t")
    assert len(owner) == len(item) == len(caption_image)
    assert torch.equal(caption_image[item], owner) and bool((owner.diff() >= 0).all())
    want = recall_at_k_reference(text, image, caption_image, FINE_KS)
    for chunk_size in (1, 7, 4096):
        assert recall_at_k(text, image, caption_image, FINE_KS, chunk_size=chunk_size) == want
    assert recall_at_k(text, image, caption_image, FINE_KS, backend="faiss") == want


def test_per_query_ranks_refuse_an_image_without_a_caption():
    """query_ranks (the paired margins read it) checks its inputs as recall_at_k does: an image without a
    caption has no own item, and wrapping round to another image's caption would count a hit."""
    from xbtcore.recall import query_ranks

    with pytest.raises(ValueError, match=r"images \[2\] have no caption"):
        query_ranks(torch.eye(3)[:2], torch.eye(3), torch.tensor([0, 1]), "i2t")
    assert query_ranks(torch.eye(3)[:2], torch.eye(3), torch.tensor([0, 1]), "t2i").tolist() == [0.0, 0.0]
