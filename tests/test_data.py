"""Parquet inputs: the happy paths and every user error CONTRACT.md names."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from worlds import shapes
from xbtcore.data import InputError, read_gallery, read_pairs, write_embeddings_parquet


@pytest.fixture(scope="module")
def world_files(tmp_path_factory):
    spec = shapes.WorldSpec(corpus_captions=200, pair_images=20, eval_images=10, captions_per_eval_image=3)
    return shapes.write_world(tmp_path_factory.mktemp("world"), spec)


@pytest.fixture(scope="module")
def pngs():
    scenes = shapes.scenes_with_captions(0, "pairs", 6, 1)
    return [shapes.png_bytes(shapes.render_scene(s, noise_seed=i)) for i, (s, _) in enumerate(scenes)]


def _write(path, **columns):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


# --- happy paths --------------------------------------------------------------


def test_image_id_groups_captions_in_first_appearance_order(world_files):
    pairs = read_pairs(world_files["eval"])
    table = pq.read_table(world_files["eval"]).to_pydict()
    assert pairs.captions == table["caption"]
    assert pairs.image_ids == list(dict.fromkeys(table["image_id"]))
    assert len(pairs.images) == 10 and len(pairs.captions) == 30
    # Independent check: each caption row points at the image with its own image_id.
    assert [pairs.image_ids[i] for i in pairs.caption_image.tolist()] == table["image_id"]
    assert pairs.caption_image.dtype == torch.long
    assert pairs.load_image(3).mode == "RGB" and pairs.load_image(3).size == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)


def test_interleaved_image_ids(tmp_path, pngs):
    f = _write(
        tmp_path / "p.parquet",
        image=[pngs[0], pngs[1], pngs[0], pngs[2], pngs[1]],
        caption=list("abcde"),
        image_id=[7, 9, 7, 3, 9],
    )
    pairs = read_pairs(f)
    assert pairs.image_ids == [7, 9, 3]
    assert pairs.caption_image.tolist() == [0, 1, 0, 2, 1]
    assert pairs.images == [pngs[0], pngs[1], pngs[2]]


def test_without_image_id_every_row_is_its_own_image(tmp_path, pngs):
    f = _write(tmp_path / "p.parquet", image=[pngs[0], pngs[0], pngs[1]], caption=["x", "y", "z"])
    pairs = read_pairs(f)
    assert len(pairs.images) == 3 and pairs.caption_image.tolist() == [0, 1, 2]


def test_image_ids_typed_as_integers_in_one_file_and_text_in_another_are_one_id(tmp_path, pngs):
    _write(tmp_path / "parts" / "a.parquet", image=[pngs[0], pngs[1]], caption=["first", "second"], image_id=[7, 8])
    _write(tmp_path / "parts" / "b.parquet", image=[pngs[0], pngs[2]], caption=["again", "third"], image_id=["7", "9"])
    pairs = read_pairs(tmp_path / "parts")
    assert pairs.image_ids == ["7", "8", "9"] and pairs.caption_image.tolist() == [0, 1, 0, 2]


def test_a_folder_where_only_some_files_have_image_id_is_refused_naming_one_without(tmp_path, pngs):
    # The id-less rows' numbers would stand in for ids, and could equal another file's (silently merged).
    _write(tmp_path / "parts" / "a.parquet", image=[pngs[0], pngs[1]], caption=["first", "second"], image_id=[0, 1])
    _write(tmp_path / "parts" / "b.parquet", image=[pngs[2], pngs[3]], caption=["third", "fourth"])
    with pytest.raises(InputError, match=r"b\.parquet: has no 'image_id' column where other files of the input"):
        read_pairs(tmp_path / "parts")


def test_image_path_relative_to_the_parquet_folder(tmp_path, pngs, monkeypatch):
    (tmp_path / "data" / "img").mkdir(parents=True)
    for i in range(2):
        (tmp_path / "data" / "img" / f"{i}.png").write_bytes(pngs[i])
    absolute = tmp_path / "elsewhere.png"
    absolute.write_bytes(pngs[2])
    _write(
        tmp_path / "data" / "p.parquet", image_path=["img/0.png", "img/1.png", str(absolute)], caption=["a", "b", "c"]
    )
    monkeypatch.chdir(tmp_path)  # resolution must not depend on the working directory
    pairs = read_pairs("data/p.parquet")
    assert pairs.images == [
        str(tmp_path / "data" / "img" / "0.png"),
        str(tmp_path / "data" / "img" / "1.png"),
        str(absolute),
    ]
    assert (
        pairs.load_image(1).tobytes()
        == read_pairs(_write(tmp_path / "b.parquet", image=[pngs[1]], caption=["b"])).load_image(0).tobytes()
    )


def test_folder_and_glob_of_files(tmp_path, pngs):
    _write(tmp_path / "parts" / "b.parquet", image=[pngs[2]], caption=["third"], image_id=["i2"])
    _write(
        tmp_path / "parts" / "a.parquet",
        image=[pngs[0], pngs[1], pngs[0]],
        caption=["first", "second", "again"],
        image_id=["i0", "i1", "i0"],
    )
    (tmp_path / "parts" / "notes.txt").write_text("not parquet, ignored")
    pairs = read_pairs(tmp_path / "parts")
    assert pairs.captions == ["first", "second", "again", "third"]  # files in sorted order
    assert pairs.image_ids == ["i0", "i1", "i2"] and pairs.caption_image.tolist() == [0, 1, 0, 2]
    assert read_pairs(str(tmp_path / "parts" / "*.parquet")).captions == pairs.captions
    (tmp_path / "parts").rename(tmp_path / "parts [x]")  # [x] in a glob is a character class
    with pytest.raises(InputError, match=r"glob matches no file: .*write a literal \[ as \[\[\]"):
        read_pairs(str(tmp_path / "parts [x]" / "*.parquet"))
    assert read_pairs(str(tmp_path / "parts [[]x]" / "*.parquet")).captions == pairs.captions


def test_a_folder_reads_its_subfolders_and_a_double_star_glob_spans_folders(tmp_path, pngs):
    # A partitioned dataset (year=2024/part-0.parquet): every file under the folder, none dropped silently.
    _write(tmp_path / "ds" / "year=2023" / "part-0.parquet", image=[pngs[0]], caption=["first"], image_id=["i0"])
    _write(tmp_path / "ds" / "year=2024" / "part-0.parquet", image=[pngs[1]], caption=["second"], image_id=["i1"])
    _write(tmp_path / "ds" / "top.parquet", image=[pngs[2]], caption=["third"], image_id=["i2"])
    _write(tmp_path / "ds" / "_tmp" / "x.parquet", image=[pngs[3]], caption=["a writer's"], image_id=["i3"])
    _write(tmp_path / "ds" / ".part-1.parquet", image=[pngs[3]], caption=["hidden"], image_id=["i3"])
    assert read_pairs(tmp_path / "ds").captions == ["third", "first", "second"]  # by path: top.parquet < year=...
    assert read_pairs(str(tmp_path / "ds" / "**" / "part-0.parquet")).captions == ["first", "second"]


def test_inline_images_to_embed_are_read_a_few_rows_at_a_time_in_order(tmp_path, pngs, monkeypatch):
    import xbtcore.embed_input as embed_input
    from xbtcore.data import LazyImages

    monkeypatch.setattr(embed_input, "READ_ROWS", 4)
    first = [pngs[i % 6] for i in range(10)]
    second = [pngs[(i + 3) % 6] for i in range(7)]
    _write(tmp_path / "g" / "a.parquet", image=first, id=list(range(10)))
    _write(tmp_path / "g" / "b.parquet", image=second, id=list(range(10, 17)))
    held = []
    batches = embed_input._image_batches

    def spy(file):
        for batch in batches(file):
            held.append(len(batch))
            yield batch

    monkeypatch.setattr(embed_input, "_image_batches", spy)
    images = embed_input.read_images(tmp_path / "g")
    assert isinstance(images.images, embed_input.InlineImages) and images.n_images == 17
    assert max(held) <= 4 and sum(held) == 17  # the check read every row once, four at a time
    held.clear()
    assert [images.images[i] for i in range(17)] == first + second  # walked in order: each batch read once
    assert sum(held) == 17
    assert images.images[2] == first[2] and images.images[12] == second[2]  # out of order: read again
    with pytest.raises(IndexError):
        images.images[17]
    lazy = LazyImages(images)
    assert [lazy[i].tobytes() for i in (0, 16)] == [images.load_image(0).tobytes(), images.load_image(16).tobytes()]
    assert images.subset([1, 11]).images == [first[1], second[1]]
    assert images.places[12] == (tmp_path / "g" / "b.parquet", 2, "image")

    # one file of paths among them: every file's images are held as a list, as they were read
    (tmp_path / "g" / "p.png").write_bytes(pngs[0])
    _write(tmp_path / "g" / "c.parquet", image_path=["p.png"], id=[17])
    mixed = embed_input.read_images(tmp_path / "g")
    assert isinstance(mixed.images, list) and mixed.images[:17] == first + second
    assert mixed.images[17] == str(tmp_path / "g" / "p.png")


def test_gallery_round_trip(tmp_path):
    emb = torch.nn.functional.normalize(torch.randn(9, 5, generator=torch.Generator().manual_seed(0)), dim=1)
    out = write_embeddings_parquet(tmp_path / "g" / "emb.parquet", emb, rows=range(10, 19))
    assert [p.name for p in out.parent.iterdir()] == ["emb.parquet"]  # no temp file left behind
    table = pq.read_table(out)
    assert table.schema.field("row").type == pa.int64()
    assert table.schema.field("embedding").type == pa.list_(pa.float32())
    ids, loaded = read_gallery(out)
    assert ids == list(range(10, 19)) and torch.equal(loaded, emb)
    ids, _ = read_gallery(write_embeddings_parquet(tmp_path / "h.parquet", emb, ids=[f"d{i}" for i in range(9)]))
    assert ids[:2] == ["d0", "d1"]


def test_a_stored_gallery_takes_an_id_held_twice_only_with_one_embedding(tmp_path):
    from xbtcore.data import Gallery

    emb = torch.nn.functional.normalize(torch.randn(4, 5, generator=torch.Generator().manual_seed(0)), dim=1)
    same = write_embeddings_parquet(
        tmp_path / "same.parquet", torch.cat([emb, emb[:1]]), ids=["a", "b", "c", "d", "a"]
    )
    positions, got = Gallery(str(same)).lookup(["c", "a"])
    assert positions == [0, 1] and torch.equal(got, emb[[2, 0]])
    other = write_embeddings_parquet(
        tmp_path / "other.parquet", torch.cat([emb, emb[1:2]]), ids=["a", "b", "c", "d", "a"]
    )
    with pytest.raises(
        InputError, match=r"other\.parquet: column 'id': holds an id again with another embedding.*\(row 4\)"
    ):
        Gallery(str(other)).lookup(["c", "a"])


# --- errors -------------------------------------------------------------------


def _error(path) -> str:
    with pytest.raises(InputError) as err:
        read_pairs(path)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_missing_caption_column_lists_the_columns(tmp_path, pngs):
    msg = _error(_write(tmp_path / "p.parquet", image=[pngs[0]], text=["a"]))
    assert "p.parquet" in msg and "'caption'" in msg and "['image', 'text']" in msg


def test_missing_image_column(world_files):
    msg = _error(world_files["corpus"])  # a text corpus has captions only
    assert "corpus.parquet" in msg and "'image_path'" in msg and "['caption']" in msg


def test_an_image_column_beside_an_image_path_column_is_refused_for_pairs_and_for_embedding(tmp_path, pngs):
    from xbtcore.embed_input import read_images

    (tmp_path / "b.png").write_bytes(pngs[1])
    f = _write(tmp_path / "both.parquet", image=[pngs[0]], image_path=["b.png"], caption=["a"])
    for read in (read_pairs, read_images):
        with pytest.raises(InputError, match=r"both.parquet: has both an 'image' and an 'image_path' column"):
            read(f)


def test_unreadable_file(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"this is not parquet at all")
    msg = _error(tmp_path / "x.parquet")
    assert "x.parquet" in msg and "not a readable Parquet file" in msg


def test_undecodable_image_names_file_column_and_row(tmp_path, pngs):
    images = [pngs[0], pngs[1], pngs[2], b"notanimage", pngs[3]]
    msg = _error(_write(tmp_path / "bad.parquet", image=images, caption=list("abcde")))
    assert "bad.parquet" in msg and "column 'image'" in msg and "(row 3)" in msg


def _jpeg(png: bytes) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(out, "JPEG")
    return out.getvalue()


def test_a_jpeg_cut_short_is_refused_on_reading_and_one_with_bytes_after_its_end_is_not(tmp_path, pngs):
    # A JPEG's header parses on its own: a download cut short passes PIL's verify and fails only when
    # its pixels are decoded, after the work that needed them.
    whole = _jpeg(pngs[0])
    cut = whole[:-40]  # past its headers: only the pixel data is short
    (tmp_path / "cut.jpg").write_bytes(cut)
    inline = _write(tmp_path / "inline.parquet", image=[pngs[1], whole, cut], caption=list("abc"))
    by_path = _write(tmp_path / "paths.parquet", image_path=["cut.jpg"], caption=["a"])
    assert "column 'image'" in _error(inline) and "(row 2)" in _error(inline)
    assert "column 'image_path'" in _error(by_path) and "(row 0)" in _error(by_path)

    padded = _write(tmp_path / "padded.parquet", image=[whole + b"\x00" * 7], caption=["a"])
    assert read_pairs(padded).load_image(0).size == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)


def test_an_image_past_pils_decompression_bomb_guard_is_named_as_too_large(tmp_path, pngs, monkeypatch):
    from PIL import Image

    f = _write(tmp_path / "p.parquet", image=pngs[:2], caption=["a", "b"])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses over twice this; the images are larger
    with pytest.raises(
        InputError, match=r"column 'image': images too large to decode \(over 200 pixels.*\(rows 0, 1\)"
    ):
        read_pairs(f)


def test_missing_image_path_file(tmp_path, pngs):
    (tmp_path / "ok.png").write_bytes(pngs[0])
    msg = _error(
        _write(tmp_path / "p.parquet", image_path=["ok.png", "gone.png", "ok.png", "gone2.png"], caption=list("abcd"))
    )
    assert "p.parquet" in msg and "'image_path'" in msg and "do not exist" in msg and "(rows 1, 3)" in msg
    (tmp_path / "gone.png").write_bytes(b"notanimage")
    (tmp_path / "gone2.png").write_bytes(pngs[1])
    msg = _error(tmp_path / "p.parquet")
    assert "'image_path'" in msg and "do not decode" in msg and "(row 1)" in msg


def test_blank_captions_name_their_rows(tmp_path, pngs):
    msg = _error(_write(tmp_path / "p.parquet", image=pngs[:4], caption=["fine", "  ", None, "fine too"]))
    assert "'caption'" in msg and "(rows 1, 2)" in msg


def test_many_bad_rows_show_the_first_five(tmp_path, pngs):
    msg = _error(_write(tmp_path / "p.parquet", image=[b"x"] * 8, caption=list("abcdefgh")))
    assert "(rows 0, 1, 2, 3, 4, and 3 more)" in msg


def test_empty_input(tmp_path):
    f = _write(tmp_path / "p.parquet", image=pa.array([], pa.binary()), caption=pa.array([], pa.string()))
    assert "no rows" in _error(f)


def test_conflicting_images_for_one_image_id(tmp_path, pngs):
    msg = _error(_write(tmp_path / "p.parquet", image=[pngs[0], pngs[1]], caption=["a", "b"], image_id=[1, 1]))
    assert "'image_id'" in msg and "(row 1)" in msg


@pytest.mark.parametrize("bad_row", [0, 2])
def test_a_broken_image_in_an_image_id_group_is_named_as_broken(tmp_path, pngs, bad_row):
    # The broken bytes differ from the group's other rows too; the error must say what is wrong with which row.
    images = [pngs[0]] * 4 + [pngs[1]]
    images[bad_row] = b"notanimage"
    msg = _error(_write(tmp_path / "p.parquet", image=images, caption=list("abcde"), image_id=[1, 1, 1, 1, 2]))
    assert "do not decode" in msg and f"(row {bad_row})" in msg


def test_a_broken_first_row_in_an_earlier_file_is_named_there(tmp_path, pngs):
    (tmp_path / "parts").mkdir()
    _write(tmp_path / "parts" / "a.parquet", image=[b"notanimage"], caption=["a"], image_id=["i0"])
    _write(tmp_path / "parts" / "b.parquet", image=[pngs[0]], caption=["b"], image_id=["i0"])
    msg = _error(tmp_path / "parts")
    assert "a.parquet" in msg and "do not decode" in msg and "(row 0)" in msg


def _scrambled_pixels(png: bytes) -> bytes:
    """The PNG with its compressed pixel data scrambled and every chunk's CRC made right again: it parses
    (what reading checks) but does not decode."""
    import struct
    import zlib

    out, i = [png[:8]], 8
    while i < len(png):
        n, kind = struct.unpack(">I4s", png[i : i + 8])
        data = png[i + 8 : i + 8 + n]
        if kind == b"IDAT":
            data = data[:2] + bytes(b ^ 0x5A for b in data[2:])
        out.append(struct.pack(">I4s", n, kind) + data + struct.pack(">I", zlib.crc32(kind + data)))
        i += 12 + n
    return b"".join(out)


def test_an_image_that_parses_but_does_not_decode_is_named_when_it_is_decoded(tmp_path, pngs):
    from xbtcore.embed_input import read_images

    f = _write(tmp_path / "p.parquet", image=[pngs[0], pngs[1], _scrambled_pixels(pngs[2])], caption=list("abc"))
    for images in (read_pairs(f), read_pairs(f).subset([2, 0]), read_images(f)):  # subsets keep the places
        good, bad = (0, 2) if images.n_images == 3 else (1, 0)
        images.load_image(good)
        with pytest.raises(InputError) as e:
            images.load_image(bad)
        msg = str(e.value)
        assert "p.parquet" in msg and "column 'image'" in msg and "does not decode" in msg and "(row 2)" in msg, msg


def test_dictionary_encoded_columns_read_as_their_values(tmp_path, pngs):
    # pandas' `category` dtype writes dictionary-encoded columns: captions, ids and paths as usual.
    (tmp_path / "a.png").write_bytes(pngs[0])
    (tmp_path / "b.png").write_bytes(pngs[1])
    plain = {"image_path": ["a.png", "b.png", "a.png"], "caption": ["x", "y", "x"], "image_id": ["i", "j", "i"]}
    _write(tmp_path / "plain.parquet", **plain)
    _write(tmp_path / "dict.parquet", **{k: pa.array(v).dictionary_encode() for k, v in plain.items()})
    want, got = read_pairs(tmp_path / "plain.parquet"), read_pairs(tmp_path / "dict.parquet")
    assert got.captions == want.captions and got.image_ids == want.image_ids and got.images == want.images
    assert torch.equal(got.caption_image, want.caption_image)


def test_check_output_names_a_read_only_folder(tmp_path, monkeypatch):
    import os

    from xbtcore.data import check_output

    assert check_output(tmp_path / "new" / "deeper", folder=True) == tmp_path / "new" / "deeper"
    # root ignores permission bits, so a read-only mount is what os.access reports here
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(tmp_path))
    with pytest.raises(InputError, match=rf"cannot be written: {tmp_path} is read-only"):
        check_output(tmp_path / "run", folder=True)


def test_sixteen_bit_grey_keeps_its_picture(tmp_path):
    import io

    import numpy as np
    from PIL import Image

    grey = np.tile(np.linspace(0, 255, 16).round().astype(np.uint8), (16, 1))  # (16, 16) a left-to-right ramp
    wide = Image.fromarray(grey.astype(np.uint16) * 257)  # the same picture at 16 bits (PNG mode I;16)
    buf = io.BytesIO()
    wide.save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    pairs = read_pairs(_write(tmp_path / "p.parquet", image=[buf.getvalue()], caption=["a ramp"]))
    got = np.asarray(pairs.load_image(0))
    assert got.shape == (16, 16, 3) and (got == grey[..., None]).all()


def test_nothing_to_read(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "no *.parquet" in _error(tmp_path / "empty")
    assert "matches no file" in _error(str(tmp_path / "*.parquet"))
    assert "no such file" in _error(tmp_path / "missing.parquet")


def test_shared_images_are_found_by_their_bytes_inline_or_at_a_path_and_not_by_id(tmp_path):
    from xbtcore.data import PairSet, shared_images

    def pairset(images, ids):
        return PairSet(images, [f"c{i}" for i in range(len(images))], torch.arange(len(images)), ids, "x")

    (tmp_path / "b.png").write_bytes(b"image b")
    (tmp_path / "q.png").write_bytes(b"image q")
    pairs = pairset([b"image a", str(tmp_path / "b.png"), b"image c"], list("123"))
    evalset = pairset([b"image c", b"image x", str(tmp_path / "q.png"), b"image b", b"image y"], list("12345"))
    assert shared_images(pairs, evalset) == [0, 3]  # ids 1 to 3 in both sets name other images
    assert shared_images(pairs, pairset([b"image z"], ["3"])) == []


def test_gallery_errors(tmp_path):
    with pytest.raises(InputError, match=r"missing column 'embedding'.*\['vec'\]"):
        read_gallery(_write(tmp_path / "a.parquet", vec=[[1.0, 2.0]]))
    ragged = pa.array([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0, 3.0]], pa.list_(pa.float32()))
    with pytest.raises(InputError, match=r"b\.parquet: column 'embedding'.*\(row 2\)"):
        read_gallery(_write(tmp_path / "b.parquet", embedding=ragged))
    bad = pa.array([[1.0, 0.0], [0.0, 1.0], [float("nan"), 1.0], [float("inf"), 0.0]], pa.list_(pa.float32()))
    with pytest.raises(InputError, match=r"c\.parquet: column 'embedding': NaN or infinite.*\(rows 2, 3\)"):
        read_gallery(_write(tmp_path / "c.parquet", embedding=bad))
    with pytest.raises(InputError, match=r"d\.parquet: column 'embedding': has type string"):
        read_gallery(_write(tmp_path / "d.parquet", embedding=["0.1,0.2"]))


def test_a_stored_gallery_names_its_bad_rows_and_a_dim_of_another_model(tmp_path):
    from xbtcore.data import Gallery

    with pytest.raises(InputError, match=r"a\.parquet: column 'embedding': has type string"):
        Gallery(_write(tmp_path / "a.parquet", id=["x"], embedding=["0.1,0.2"]))
    emb = pa.array([[1.0, 0.0], [0.0, 1.0], [float("nan"), 1.0], [0.6, 0.8, 0.0]], pa.list_(pa.float32()))
    gallery = Gallery(_write(tmp_path / "b.parquet", id=["p", "q", "r", "s"], embedding=emb))
    positions, found = gallery.lookup(["q", "zz", "p"])  # the rows looked up are read, the others are not
    assert positions == [0, 2] and found.tolist() == [[0.0, 1.0], [1.0, 0.0]]
    with pytest.raises(InputError, match=r"b\.parquet: column 'embedding': NaN or infinite.*\(row 2\)"):
        gallery.lookup(["p", "r"])
    with pytest.raises(InputError, match=r"b\.parquet: column 'embedding': embeddings of different.*\(row 3\)"):
        gallery.lookup(["q", "s"])
    gallery.check_dim(2, "old-model")
    with pytest.raises(InputError, match=r"holds 2-d embeddings; the old model old-model embeds images in 3-d"):
        gallery.check_dim(3, "old-model")


def test_validation_split_holds_out_whole_images_by_id_whatever_the_row_order():
    import random

    from xbtcore.data import PairSet, ValSplit, split_pairs

    ids = [f"im{i}" for i in range(40)]
    caption_image = torch.tensor([i // 3 for i in range(120)] + [39])  # 3 captions each, one image with 4
    captions = [f"c{r}" for r in range(len(caption_image))]
    pairs = PairSet([f"/img/{i}.png" for i in ids], captions, caption_image, ids, "x")
    train, val = split_pairs(pairs, ValSplit(0.1, min_images=8, seed=0))
    assert val.n_images == 8 and train.n_images == 32  # at least min_images
    assert not set(train.image_ids) & set(val.image_ids)
    assert len(train.captions) + len(val.captions) == len(captions)
    for part in (train, val):  # each caption still points at its own image
        for c, i in zip(part.captions, part.caption_image.tolist()):
            assert pairs.image_ids[pairs.caption_image[captions.index(c)]] == part.image_ids[i]

    order = list(range(40))
    random.Random(1).shuffle(order)
    shuffled = pairs.subset(order)
    assert set(split_pairs(shuffled, ValSplit(0.1, min_images=8, seed=0))[1].image_ids) == set(val.image_ids)
    assert set(split_pairs(pairs, ValSplit(0.1, min_images=8, seed=1))[1].image_ids) != set(val.image_ids)
    assert split_pairs(pairs, ValSplit(0.5, min_images=1, seed=0))[1].n_images == 20  # at most half
    assert split_pairs(pairs, None) == (pairs, None) and split_pairs(pairs, ValSplit(0.0)) == (pairs, None)
