"""Reading and checking the Parquet inputs of CONTRACT.md (pyarrow only).

Every problem a user can cause (a missing column, an unreadable file, an image
that does not decode, an empty input) is an InputError naming the file, the
column, the first offending rows (0-based row numbers within that file) and the
fix. Outputs are written to a temporary name and renamed, so an interrupted
run never leaves a file that looks finished.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image

_SHOW_ROWS = 5
_GLOB_CHARS = set("*?[")
_PAIRS_FIX = "image-text pairs need 'caption' and 'image' (binary) or 'image_path' (string) columns; rename yours"


class InputError(ValueError):
    """A user input that breaks the contract; the message says where and how to fix it."""

    def __init__(self, file, problem: str, fix: str, column: str | None = None, rows: Sequence[int] = ()):
        self.file, self.column, self.rows = str(file), column, list(rows)
        where = f"{file}" + (f": column '{column}'" if column else "")
        shown = ""
        if rows:
            shown = (" (row " if len(rows) == 1 else " (rows ") + ", ".join(str(r) for r in list(rows)[:_SHOW_ROWS])
            shown += f", and {len(rows) - _SHOW_ROWS} more)" if len(rows) > _SHOW_ROWS else ")"
        super().__init__(f"{where}: {problem}{shown}: {fix}")


# --- files --------------------------------------------------------------------


def check_output(path, folder: bool) -> Path:
    """Fail before any work when `path` (an output folder, or a file when folder=False) cannot be written."""
    p = Path(path).expanduser()
    if folder and p.exists() and not p.is_dir():
        raise InputError(path, "is a file, not a folder", "pass a folder for the run's outputs")
    if not folder and p.is_dir():
        raise InputError(path, "is a folder", "pass a file path such as DIR/embeddings.parquet")
    here = p if folder and p.is_dir() else p.parent
    while not here.exists():
        here = here.parent
    if not here.is_dir():
        raise InputError(path, f"cannot be created: {here} is a file", "pass a path under a folder")
    if not os.access(here, os.W_OK | os.X_OK):
        raise InputError(path, f"cannot be written: {here} is read-only or not ours", "pass a writable path")
    return p


def parquet_files(path) -> list[Path]:
    """One file, every *.parquet under a folder, its subfolders too (sorted by path; names starting with . or _
    skipped, as pyarrow's datasets skip them), or the files a glob matches (sorted; ** spans folders)."""
    text = str(path)
    p = Path(text).expanduser()
    if p.is_dir():
        files = sorted(
            f
            for f in p.rglob("*.parquet")
            if f.is_file() and not any(part.startswith((".", "_")) for part in f.relative_to(p).parts)
        )
        if not files:
            raise InputError(
                p, "folder holds no *.parquet file", "point at a Parquet file, a folder of them or a glob"
            )
        return files
    if p.is_file():
        return [p]
    if _GLOB_CHARS & set(text):
        files = sorted(Path(f) for f in _glob.glob(os.path.expanduser(text), recursive=True) if Path(f).is_file())
        if not files:
            fix = "check the pattern"
            if "[" in text:  # a folder named "runs [x]" reads as a character class
                fix += "; [ starts a character class in a glob: write a literal [ as [[]"
            raise InputError(text, "glob matches no file", fix)
        return files
    raise InputError(text, "no such file or folder", "check the path")


def unreadable_parquet(file: Path, e: Exception) -> InputError:
    """The error for a file pyarrow cannot read (raised `from e`)."""
    return InputError(
        file,
        f"not a readable Parquet file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
        "pass a Parquet file (e.g. written by pyarrow or pandas.to_parquet)",
    )


def _read_table(file: Path, columns: list[str] | None = None) -> pa.Table:
    try:
        return pq.read_table(file, columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise unreadable_parquet(file, e) from e


def parquet_schema(file: Path) -> pa.Schema:
    """A Parquet file's schema; an InputError naming the file where it is not readable Parquet."""
    try:
        return pq.read_schema(file)
    except (pa.ArrowException, OSError) as e:
        raise InputError(
            file,
            f"not a readable Parquet file ({type(e).__name__})",
            "pass a Parquet file (e.g. written by pyarrow or pandas.to_parquet)",
        ) from e


def _missing_column(file: Path, wanted: str, schema: pa.Schema, fix: str) -> InputError:
    return InputError(file, f"missing column {wanted}; the file has columns {schema.names}", fix)


def _values(t: pa.DataType) -> pa.DataType:
    """The type of the values a column holds: a dictionary-encoded column (pandas' `category`) holds its
    dictionary's type, and reads back as plain values."""
    return t.value_type if pa.types.is_dictionary(t) else t


def is_text_type(t: pa.DataType) -> bool:
    t = _values(t)
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def ids_as_text(files: list[Path], column: str) -> bool:
    """Whether `column` is text in some files and integers in others: its ids then compare as text, so that
    7 in one file and "7" in another are one id (as a stored gallery compares them)."""
    types = [schema.field(column).type for schema in map(parquet_schema, files) if column in schema.names]
    return len({is_text_type(t) for t in types}) > 1


def lacks_column(file: Path, column: str) -> InputError:
    """The error for a file of a multi-file input without an id column the others have: its rows' numbers
    would stand in for ids, and could equal the other files'."""
    return InputError(
        file,
        f"has no '{column}' column where other files of the input have one",
        f"give every file the column {column} (or none of them)",
    )


def _is_bytes(t: pa.DataType) -> bool:
    t = _values(t)
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _null_rows(column: pa.ChunkedArray) -> list[int]:
    return np.flatnonzero(pc.is_null(column).to_numpy(zero_copy_only=False)).tolist()


# --- image-text pairs ---------------------------------------------------------


@dataclass
class PairSet:
    """Image-text pairs (or an eval set): distinct images, one caption per row.

    `images[i]` is the encoded bytes (PNG/JPEG) or the absolute path of image i;
    `caption_image[c]` is the index into `images` of caption c's image.
    """

    images: list
    captions: list[str]
    caption_image: torch.Tensor  # (n_captions,) long
    image_ids: list
    source: str
    places: list | None = None  # per image, (file, row, column) where it first appears: for errors

    def __post_init__(self):
        assert len(self.images) == len(self.image_ids), "one id per distinct image"
        assert self.caption_image.shape == (len(self.captions),), "one image index per caption"
        assert self.places is None or len(self.places) == len(self.images), "one place per distinct image"

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def n_images(self) -> int:
        return len(self.images)

    def load_image(self, i: int) -> Image.Image:
        """Image i decoded, in RGB; an InputError naming its file, column and row where it does not decode (the
        check on reading parses each stream without decoding its pixels, so a corrupt one can pass it)."""
        try:
            return to_rgb(_open_image(self.images[i]))
        except Exception as e:
            file, row, column = self.places[i] if self.places else (self.source, None, None)
            raise InputError(
                file,
                f"an image does not decode ({type(e).__name__}: {' '.join(str(e).split())})",
                "store PNG or JPEG images",
                column=column,
                rows=() if row is None else (row,),
            ) from e

    def subset(self, image_indices) -> "PairSet":
        """These distinct images (in this order) with all their captions, in row order."""
        keep = torch.as_tensor(list(image_indices), dtype=torch.long)  # (k,)
        new_index = torch.full((self.n_images,), -1, dtype=torch.long)
        new_index[keep] = torch.arange(len(keep))
        rows = (new_index[self.caption_image] >= 0).nonzero().flatten()  # (r,) caption rows kept
        return PairSet(
            [self.images[i] for i in keep.tolist()],
            [self.captions[r] for r in rows.tolist()],
            new_index[self.caption_image[rows]],
            [self.image_ids[i] for i in keep.tolist()],
            self.source,
            None if self.places is None else [self.places[i] for i in keep.tolist()],
        )


def _inline(src) -> bool:
    """An image stored in the Parquet as its encoded bytes; else `src` is the path of its file."""
    return isinstance(src, (bytes, bytearray))


def _open_image(src) -> Image.Image:
    return Image.open(io.BytesIO(src) if _inline(src) else src)


def _image_bytes(src) -> bytes:
    return bytes(src) if _inline(src) else Path(src).read_bytes()


def _image_size(src) -> int:
    return len(src) if _inline(src) else os.path.getsize(src)


def image_keys(images: PairSet) -> list[tuple[int, bytes]]:
    """Each image's (length, SHA-1) of its encoded bytes: what repeated_images and shared_images compare, read
    once for both."""
    return [(len(data), hashlib.sha1(data).digest()) for data in map(_image_bytes, images.images)]


def repeated_images(images: PairSet, keys: list[tuple[int, bytes]] | None = None) -> list[int]:
    """The images whose encoded bytes an earlier image of the set has too: indices into `images.images`.
    keys: image_keys(images), where already read."""
    seen: set[tuple[int, bytes]] = set()
    repeats = []
    for i, key in enumerate(image_keys(images) if keys is None else keys):
        if key in seen:
            repeats.append(i)
        seen.add(key)
    return repeats


def has_image_ids(path) -> bool:
    """Whether an input's rows carry image_id (read_pairs takes all of its files with it or none)."""
    return "image_id" in parquet_schema(parquet_files(path)[0]).names


def shared_images(pairs: PairSet, evalset: PairSet, keys: list[tuple[int, bytes]] | None = None) -> list[int]:
    """The eval images whose encoded bytes are also a pair image's (stored inline or at a path): indices into
    `evalset.images`. Ids are not compared, since two sets may number their images alike. Only pair images
    of a length some eval image has are read and hashed. keys: image_keys(evalset), where already read."""
    wanted: dict[tuple[int, bytes], list[int]] = {}  # (length, SHA-1) -> eval image indices
    for i, key in enumerate(image_keys(evalset) if keys is None else keys):
        wanted.setdefault(key, []).append(i)
    lengths = {n for n, _ in wanted}
    shared: set[int] = set()
    for item in pairs.images:
        n = _image_size(item)
        if n in lengths:
            shared.update(wanted.get((n, hashlib.sha1(_image_bytes(item)).digest()), ()))
    return sorted(shared)


@dataclass(frozen=True)
class ValSplit:
    """A validation share of the pairs' images, held out of all training (CONTRACT.md, --val-fraction).

    The images are drawn by a hash of (seed, image id): the same ids give the same split whatever
    the row order. At least `min_images` go to validation (half the images at most).
    """

    fraction: float = 0.1
    min_images: int = 500
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.fraction}")

    def val_images(self, image_ids: Sequence) -> list[int]:
        """Indices of the validation images, in their original order; none at fraction 0."""
        n = len(image_ids)
        if self.fraction == 0 or n < 2:
            return []
        n_val = min(max(math.ceil(self.fraction * n), self.min_images), n // 2)
        rank = sorted(range(n), key=lambda i: hashlib.sha1(f"{self.seed}:{image_ids[i]!r}".encode()).digest())
        return sorted(rank[:n_val])


def split_pairs(pairs: PairSet, split: ValSplit | None) -> tuple[PairSet, PairSet | None]:
    """(train, validation) pairs; the whole set and None without a split."""
    val = split.val_images(pairs.image_ids) if split is not None else []
    if not val:
        return pairs, None
    held = set(val)
    return pairs.subset(i for i in range(pairs.n_images) if i not in held), pairs.subset(val)


def read_part(path, part: str = "all", split: ValSplit | None = None) -> PairSet:
    """The pairs at `path`, or one part of them: "train" or "val" of `split` (split_pairs)."""
    pairs = read_pairs(path)
    if part == "all":
        return pairs
    train, val = split_pairs(pairs, split)
    if part == "train":
        return train
    if part == "val" and val is not None:
        return val
    raise ValueError(f"part must be all, train or val (val needs a split with fraction > 0), got {part!r}")


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with 16-bit grey (PNG) scaled to 8 bits: PIL's own convert clips it, so all but the
    darkest pixels turn white; transparent pixels composited onto white, as transformers' image
    processors do (PIL's convert drops the alpha and shows what the transparent pixels hide)."""
    if img.mode.startswith("I;16") or (img.mode == "I" and img.getextrema()[1] > 255):
        img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257.0).round().clip(0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


_JPEG_END = b"\xff\xd9"  # the end-of-image marker


def _check_decodes(src) -> bool:
    """Whether an image reads: its whole stream parsed without decoding pixels (PNG: every chunk's CRC). A
    JPEG parses from its header alone, so one that does not end in its end marker (a download cut short) is
    decoded in full: a truncated stream fails there, bytes after the marker do not."""
    try:
        with _open_image(src) as img:
            if img.format == "JPEG":
                img.fp.seek(-len(_JPEG_END), os.SEEK_END)
                if img.fp.read() != _JPEG_END:
                    img.load()  # from the file PIL holds open; load seeks back to the pixel data
                    return True
            img.verify()
        return True
    except Exception:
        return False


def _too_large(src) -> bool:
    """Whether PIL refuses the image as a decompression bomb (more than twice Image.MAX_IMAGE_PIXELS)."""
    try:
        with _open_image(src):
            return False
    except Image.DecompressionBombError:
        return True
    except Exception:
        return False


def image_column(file: Path, schema: pa.Schema) -> str | None:
    """The column that holds a file's images: 'image' (encoded bytes) or 'image_path'; None for neither. A
    file with both is refused: which of two possibly different pictures a row stands for is not ours to
    guess."""
    if "image" in schema.names and "image_path" in schema.names:
        raise InputError(
            file,
            "has both an 'image' and an 'image_path' column",
            "keep one: the images' bytes in 'image' or their files in 'image_path'",
        )
    return "image" if "image" in schema.names else "image_path" if "image_path" in schema.names else None


def _read_pairs_file(file: Path):
    """(captions, image sources, image ids or None) of one file, every row checked."""
    schema = parquet_schema(file)
    if "caption" not in schema.names:
        raise _missing_column(file, "'caption'", schema, _PAIRS_FIX)
    image_col = image_column(file, schema)
    if image_col is None:
        raise _missing_column(file, "'image' (PNG/JPEG bytes) or 'image_path'", schema, _PAIRS_FIX)
    columns = ["caption", image_col] + (["image_id"] if "image_id" in schema.names else [])
    table = _read_table(file, columns)

    for name, ok in [("caption", is_text_type), (image_col, _is_bytes if image_col == "image" else is_text_type)]:
        if not ok(table.schema.field(name).type):
            raise InputError(
                file,
                f"has type {table.schema.field(name).type}",
                "store captions and image paths as strings and images as binary",
                column=name,
            )

    captions = table.column("caption").to_pylist()
    blank = [r for r, c in enumerate(captions) if c is None or not c.strip()]
    if blank:
        raise InputError(
            file, "null or blank captions", "drop those rows or fill in their captions", column="caption", rows=blank
        )

    sources = table.column(image_col).to_pylist()
    missing = [r for r, s in enumerate(sources) if s is None or (image_col == "image_path" and not s.strip())]
    if missing:
        raise InputError(
            file, "null images", "drop those rows or fill in their images", column=image_col, rows=missing
        )
    if image_col == "image_path":
        folder = file.absolute().parent
        sources = [os.path.normpath(folder / Path(s).expanduser()) for s in sources]  # an absolute s replaces folder

    ids = None
    if "image_id" in table.column_names:
        id_col = table.column("image_id")
        if not (is_text_type(id_col.type) or pa.types.is_integer(_values(id_col.type))):
            raise InputError(
                file, f"has type {id_col.type}", "store image ids as strings or integers", column="image_id"
            )
        null_ids = _null_rows(id_col)
        if null_ids:
            raise InputError(
                file,
                "null image ids",
                "give every row an image_id (or drop the column)",
                column="image_id",
                rows=null_ids,
            )
        ids = id_col.to_pylist()
    return captions, sources, ids, image_col


def read_pairs(path) -> PairSet:
    """Image-text pairs or an eval set: one Parquet file, a folder of them or a glob.

    Rows sharing an `image_id` (across all files) are one image with several
    captions, in order of first appearance; without `image_id` every row is its
    own image (its id is its row number in the whole input). Every distinct
    image is checked to decode.
    """
    files = parquet_files(path)
    with_ids = [f for f in files if "image_id" in parquet_schema(f).names]
    if with_ids and len(with_ids) < len(files):
        raise lacks_column(next(f for f in files if f not in with_ids), "image_id")
    as_text = ids_as_text(files, "image_id")
    images, image_ids, captions, caption_image = [], [], [], []
    index_of: dict = {}  # image_id -> index into images
    first_row: dict = {}  # image index -> (file, row, column) where it first appeared, for errors
    offset = 0
    for file in files:
        caps, sources, ids, image_col = _read_pairs_file(file)
        conflicts = []
        for r, (cap, src) in enumerate(zip(caps, sources)):
            key = (str(ids[r]) if as_text else ids[r]) if ids is not None else offset + r
            i = index_of.get(key)
            if i is None:
                i = index_of[key] = len(images)
                images.append(src)
                image_ids.append(key)
                first_row[i] = (file, r, image_col)
            elif images[i] != src:
                conflicts.append((r, i))
            captions.append(cap)
            caption_image.append(i)
        if conflicts:
            # A row whose image is broken also differs from the rest of its group: name it as broken, not as
            # another image (the group's first row counts too, wherever it appeared).
            _raise_image_problems(
                [first_row[i] + (images[i],) for _, i in conflicts]
                + [(file, r, image_col, sources[r]) for r, _ in conflicts]
            )
            raise InputError(
                file,
                "rows share an image_id but not the same image",
                "give different images different image_ids",
                column="image_id",
                rows=[r for r, _ in conflicts],
            )
        offset += len(caps)
    if not captions:
        raise InputError(path, "no rows", "pass a non-empty input")

    # Rows are reported where each distinct image first appears, file by file.
    _raise_image_problems([first_row[i] + (src,) for i, src in enumerate(images)])
    places = [first_row[i] for i in range(len(images))]
    return PairSet(images, captions, torch.tensor(caption_image, dtype=torch.long), image_ids, str(path), places)


def _raise_image_problems(places: list[tuple]) -> None:
    """places: (file, row, column, image source). Raises for the first file with a missing or undecodable image."""
    missing: dict[Path, list[int]] = {}
    undecodable: dict[tuple[Path, str], list[int]] = {}
    for file, r, col, src in places:
        if col == "image_path" and not Path(src).is_file():
            missing.setdefault(file, []).append(r)
        elif not _check_decodes(src):
            undecodable.setdefault((file, col), []).append(r)
    if missing:
        file, rows = next(iter(missing.items()))
        raise InputError(
            file,
            "image files do not exist",
            "fix the paths (relative ones are relative to the Parquet file's folder)",
            column="image_path",
            rows=sorted(set(rows)),
        )
    if undecodable:
        (file, col), rows = next(iter(undecodable.items()))
        huge = sorted({r for f, r, c, src in places if (f, c) == (file, col) and r in rows and _too_large(src)})
        if huge:
            raise InputError(
                file,
                f"images too large to decode (over {2 * Image.MAX_IMAGE_PIXELS:,} pixels, PIL's guard against "
                "decompression bombs)",
                "downscale them (the model reads a few hundred pixels a side)",
                column=col,
                rows=huge,
            )
        raise InputError(file, "images do not decode", "store PNG or JPEG images", column=col, rows=sorted(set(rows)))


# --- gallery embeddings -------------------------------------------------------


def _embedding_block(file, column, rows: np.ndarray, dim: int | None = None) -> np.ndarray:
    """Embeddings read from `file` at its rows `rows` (n,) -> (n, D) float32; an InputError naming the rows
    that are null, of another length than `dim` (or than the first, without one), or hold NaN or inf."""
    nulls = _null_rows(column)
    if nulls:
        raise InputError(file, "null embeddings", "drop those rows", column="embedding", rows=rows[nulls].tolist())
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)  # (n,)
    dim = int(lengths[0]) if dim is None else dim
    ragged = np.flatnonzero(lengths != dim)
    if len(ragged):
        raise InputError(
            file,
            f"embeddings of different lengths (expected {dim})",
            "write every embedding with the same model",
            column="embedding",
            rows=rows[ragged].tolist(),
        )
    values = pc.list_flatten(column)
    if values.null_count:
        raise InputError(file, "null values inside embeddings", "write complete embeddings", column="embedding")
    block = values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(rows), dim)
    bad = np.flatnonzero(~np.isfinite(block).all(axis=1))
    if len(bad):
        raise InputError(
            file,
            "NaN or infinite values inside embeddings",
            "embed those rows again with `xbt embed`, or drop them",
            column="embedding",
            rows=rows[bad].tolist(),
        )
    return block


def _check_embedding_type(file, schema: pa.Schema) -> None:
    kind = schema.field("embedding").type
    if not (
        pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    ) or not pa.types.is_floating(kind.value_type):
        raise InputError(file, f"has type {kind}", "store embeddings as list<float32>", column="embedding")


def read_gallery(path) -> tuple[list, torch.Tensor]:
    """(ids, (N, D) float32 embeddings) from a gallery: `embedding` list<float>,
    ids from `id`, else `row` (as `xbt embed` writes), else the row number."""
    ids: list = []
    blocks: list[np.ndarray] = []  # (n_i, D) each
    dim = None
    for file in parquet_files(path):
        schema = parquet_schema(file)
        if "embedding" not in schema.names:
            raise _missing_column(file, "'embedding'", schema, "pass a gallery written by `xbt embed`")
        id_col = next((c for c in ("id", "row") if c in schema.names), None)
        _check_embedding_type(file, schema)
        table = _read_table(file, ["embedding"] + ([id_col] if id_col else []))
        column = table.column("embedding")
        start = 0
        for chunk in column.chunks:  # chunk by chunk: one list array holds under 2**31 values
            if len(chunk):
                block = _embedding_block(file, chunk, start + np.arange(len(chunk)), dim)  # (n, D)
                dim = block.shape[1]
                blocks.append(block)
            start += len(chunk)
        ids += table.column(id_col).to_pylist() if id_col else list(range(len(ids), len(ids) + table.num_rows))
    if not ids:
        raise InputError(path, "no rows", "pass a non-empty gallery")
    return ids, torch.from_numpy(np.concatenate(blocks))


# check_holds' wording per input: whose image_id, which images the old image tower embeds instead, the flag to drop
_HELD_BY = {
    "--pairs": ("pairs", "pair images", "--gallery"),
    "--eval": ("eval images", "eval images", "--eval-in-gallery"),
}


class Gallery:
    """A stored gallery (`xbt embed` output: `embedding`, `id`), looked up by id without loading it whole.

    Ids match as text ("7" and 7 are one id): a Parquet column holds one type, and the pairs'
    image_id may be stored as the other.
    """

    def __init__(self, path):
        self.path = str(path)
        self.files = parquet_files(path)
        for file in self.files:
            schema = parquet_schema(file)
            if "embedding" not in schema.names or "id" not in schema.names:
                missing = "'embedding'" if "embedding" not in schema.names else "'id'"
                raise _missing_column(
                    file,
                    missing,
                    schema,
                    "pass a gallery written by `xbt embed` from an input with image_id or id",
                )
            _check_embedding_type(file, schema)

    def ids(self) -> list[str]:
        """Every row's id, as text; an InputError names the rows without one."""
        ids = []
        for file in self.files:
            column = _read_table(file, ["id"]).column("id")
            nulls = _null_rows(column)
            if nulls:
                raise InputError(file, "null ids", "give every row the image_id it embeds, or drop it", "id", nulls)
            ids += [str(i) for i in column.to_pylist()]
        return ids

    def check_holds(
        self, image_ids: Sequence, source, flag: str = "--pairs", ids: list[str] | None = None
    ) -> list[str]:
        """The gallery's ids (`ids()`, or `ids` where already read); an InputError where it holds none of the
        image ids of `flag`'s file `source`: its `id` numbers something else (rows, captions, another export),
        and the old image tower would embed every one of those images after all (--pairs: the pair images;
        --eval: the eval images, under --eval-in-gallery)."""
        ids = self.ids() if ids is None else ids
        held = set(ids)
        if not any(str(i) in held for i in image_ids):
            owner, images, leave_out = _HELD_BY[flag]
            raise InputError(
                self.path,
                f"holds none of the image_id values of {flag} {source} ({flag[2:]}: "
                + ", ".join(repr(str(i)) for i in image_ids[:3])
                + "; gallery: "
                + ", ".join(repr(i) for i in ids[:3])
                + ")",
                f"write it with `xbt embed` from an input whose image_id (or id) is the {owner}' image_id, or leave "
                f"out {leave_out}: the old image tower then embeds the {images}",
                column="id",
            )
        return ids

    def check_dim(self, dim: int, model: str) -> None:
        """An InputError unless the first stored embedding has `model`'s `dim`: a gallery of another model
        fails here, in seconds, instead of inside training. Reads one row."""
        for file in self.files:
            for batch in pq.ParquetFile(file).iter_batches(batch_size=1, columns=["embedding"]):
                first = batch.column(0)[0] if batch.num_rows else None
                if first is None:
                    continue
                if first.is_valid and len(first) != dim:
                    raise InputError(
                        file,
                        f"holds {len(first)}-d embeddings; the old model {model} embeds images in {dim}-d",
                        "pass the gallery that model embedded (`xbt embed --model OLD --modality image`)",
                        column="embedding",
                    )
                return

    @property
    def fingerprint(self) -> str:
        """Names, sizes and modification times of its files: another gallery, or this one rewritten, differs."""
        h = hashlib.sha256()
        for f in self.files:
            st = f.stat()
            h.update(f"{f.absolute()}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    def lookup(self, wanted_ids: Sequence) -> tuple[list[int], torch.Tensor]:
        """(positions in wanted_ids found in the gallery, their embeddings (n_found, D)). An id held twice must
        hold one embedding (to float noise): an InputError names the rows that differ from its first."""
        want: dict[str, int] = {}
        for pos, i in enumerate(wanted_ids):
            want.setdefault(str(i), pos)
        found: dict[int, np.ndarray] = {}
        for file in self.files:
            table = _read_table(file, ["id", "embedding"])
            ids = [str(i) for i in table.column("id").to_pylist()]
            rows = [r for r, i in enumerate(ids) if i in want]
            if not rows:
                continue
            emb = _embedding_block(file, table.column("embedding").take(pa.array(rows)), np.asarray(rows))  # (n, D)
            differ = []
            for r, e in zip(rows, emb):
                first = found.setdefault(want[ids[r]], e)
                if first is not e and np.abs(first - e).max() > 1e-4:
                    differ.append(r)
            if differ:
                raise InputError(
                    file,
                    "holds an id again with another embedding than its first row's",
                    "keep one row per id, the old model's embedding of that image",
                    column="id",
                    rows=differ,
                )
        positions = sorted(found)
        if not positions:
            return [], torch.empty(0, 0)
        return positions, torch.from_numpy(np.stack([found[p] for p in positions]))


STAMP_KEYS = ("model", "space", "modality")  # what `xbt embed` stamps on its output, as xbt.KEY metadata


def read_stamp(path) -> dict | None:
    """The model, space and modality an embedding Parquet was stamped with (write_embeddings_parquet's
    `stamp`), with its rows; None for a file without one (or not Parquet: its reader says so)."""
    try:
        meta = pq.ParquetFile(path).metadata
    except Exception:
        return None
    kv = meta.metadata or {}
    if not all(f"xbt.{k}".encode() in kv for k in STAMP_KEYS):
        return None
    return {k: kv[f"xbt.{k}".encode()].decode() for k in STAMP_KEYS} | {"rows": meta.num_rows}


def write_embeddings_parquet(path, embeddings, rows=None, ids=None, stamp: dict | None = None) -> Path:
    """Write `row` (int64), `embedding` (list<float32>) and, if given, `id`.

    stamp: {"model", "space", "modality"}, kept in the file's metadata (read_stamp), so that a copy of the
    file still says which space its vectors are in.
    Atomic: written to a temporary file in the same folder, then renamed.
    Normalising is the caller's job (CONTRACT: `xbt embed` writes L2-normalised).
    """
    emb = np.ascontiguousarray(
        embeddings.detach().cpu().float().numpy() if isinstance(embeddings, torch.Tensor) else embeddings,
        dtype=np.float32,
    )
    assert emb.ndim == 2, f"embeddings must be (N, D), got shape {emb.shape}"
    n, d = emb.shape
    rows = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    assert rows.shape == (n,), "one row number per embedding"
    # list<float32> has int32 offsets: build it in chunks of under 2**31 values.
    step = max(1, 2**30 // max(d, 1))
    chunks = []
    for start in range(0, n, step):
        block = emb[start : start + step]  # (m, D)
        offsets = np.arange(0, (len(block) + 1) * d, d, dtype=np.int32)
        chunks.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(block.reshape(-1))))
    columns = {"row": pa.array(rows), "embedding": pa.chunked_array(chunks, type=pa.list_(pa.float32()))}
    if ids is not None:
        ids = list(ids)
        assert len(ids) == n, "one id per embedding"
        columns["id"] = pa.array(ids)
    table = pa.table(columns)
    if stamp is not None:
        table = table.replace_schema_metadata({f"xbt.{k}": str(stamp[k]) for k in STAMP_KEYS})

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


class LazyImages:
    """Images [start, stop) of anything with `load_image(i)` and `n_images`,
    decoded on access: embedding decodes one batch at a time."""

    def __init__(self, source, start: int = 0, stop: int | None = None):
        self.source, self.start = source, start
        self.n = (source.n_images if stop is None else stop) - start

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.source.load_image(self.start + i)
