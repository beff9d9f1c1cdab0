"""Inputs of `xbt embed`: one text or one image per Parquet row, in row order.

Unlike a corpus (deduplicated) or a pair set (grouped by image_id), a gallery
keeps every row: the output's `row` is the input row index.
"""

from __future__ import annotations

import bisect
import itertools
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .data import (
    InputError,
    PairSet,
    _is_bytes,
    _read_table,
    ids_as_text,
    is_text_type,
    lacks_column,
    parquet_files,
    parquet_schema,
    unreadable_parquet,
)

_IMAGE_FIX = "store images as 'image' (PNG/JPEG bytes) or 'image_path' (string) columns"


def read_texts(path, column: str = "caption") -> list[str]:
    texts: list[str] = []
    for file in parquet_files(path):
        schema = parquet_schema(file)
        if column not in schema.names:
            ids_or_paths = ("image_path", "id", "image_id")
            texts_in = [f.name for f in schema if is_text_type(f.type) and f.name not in ids_or_paths]
            if texts_in:
                fix = f"name the text column with --text-column NAME (its text columns: {texts_in})"
            elif {"image", "image_path"} & set(schema.names):
                fix = "it holds images: embed them with --modality image"
            else:
                fix = "name the text column with --text-column NAME"
            raise InputError(file, f"missing column '{column}'; the file has columns {schema.names}", fix)
        col = _read_table(file, [column]).column(column)
        if not is_text_type(col.type):
            raise InputError(file, f"has type {col.type}", "store texts as strings", column=column)
        values = col.to_pylist()
        blank = [i for i, v in enumerate(values) if v is None or not v.strip()]  # as pair captions: refused
        if blank:
            raise InputError(file, "null or blank texts", "drop those rows or fill them in", column=column, rows=blank)
        texts += values
    if not texts:
        raise InputError(path, "no rows", "pass a non-empty input")
    return texts


READ_ROWS = 256  # inline images read from a file at a time, checking them and embedding them


class InlineImages:
    """The `image` column (encoded PNG/JPEG) of Parquet files as one sequence, read READ_ROWS rows at a time
    as it is walked in order, as embedding walks it: a gallery's image bytes are never all in memory (as one
    list, 100,000 inline PNGs took 3.1 GB). Reading out of order restarts that file's reader."""

    def __init__(self, files: list[Path], rows: list[int]):
        self.files = files
        self.starts = list(itertools.accumulate(rows, initial=0))  # (files + 1,) each file's first row
        self._file, self._batches, self._lo, self._batch = None, None, 0, []

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        if not self._lo <= i < self._lo + len(self._batch):
            f = bisect.bisect_right(self.starts, i) - 1
            if f != self._file or i < self._lo:  # another file, or back in this one: from its first row
                self._file, self._batches = f, _image_batches(self.files[f])
                self._lo, self._batch = self.starts[f], []
            while i >= self._lo + len(self._batch):
                self._lo += len(self._batch)
                self._batch = next(self._batches)
        return self._batch[i - self._lo]


def _image_batches(file: Path):
    """A file's `image` values, READ_ROWS at a time."""
    try:
        for batch in pq.ParquetFile(file).iter_batches(batch_size=READ_ROWS, columns=["image"]):
            yield batch.column(0).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise unreadable_parquet(file, e) from e


def read_images(path) -> PairSet:
    """Every row's image as its own image of a PairSet (captions empty); paths resolved, decoding checked.
    Where every file holds its images inline, they are read on access (InlineImages), not held."""
    from .data import _check_decodes, image_column

    columns, values = [], []
    files = parquet_files(path)
    for file in files:
        schema = parquet_schema(file)
        col_name = image_column(file, schema)
        if col_name is None:
            texts = [n for n in schema.names if is_text_type(schema.field(n).type)]
            fix = f"it holds text ({', '.join(texts)}): embed it with --modality text" if texts else _IMAGE_FIX
            raise InputError(file, f"missing column 'image' or 'image_path'; the file has columns {schema.names}", fix)
        kind = schema.field(col_name).type
        if not (_is_bytes(kind) if col_name == "image" else is_text_type(kind)):
            raise InputError(file, f"has type {kind}", _IMAGE_FIX, column=col_name)
        columns.append(col_name)
    inline = all(c == "image" for c in columns)
    rows: list[int] = []
    for file, col_name in zip(files, columns):
        if col_name == "image_path":
            folder = file.absolute().parent
            paths = _read_table(file, [col_name]).column(col_name).to_pylist()
            file_values = [
                None if v is None or v == "" else os.path.normpath(folder / Path(v).expanduser()) for v in paths
            ]
            batches = [file_values]
        else:
            batches = _image_batches(file)
        nulls, bad, n = [], [], 0
        for batch in batches:
            for r, v in enumerate(batch, n):
                if v is None or v == "":
                    nulls.append(r)
                elif not _check_decodes(v):
                    bad.append(r)
            n += len(batch)
            if not inline:
                values += batch
        if nulls:
            raise InputError(
                file, "null images", "drop those rows or fill in their images", column=col_name, rows=nulls
            )
        if bad:
            raise InputError(
                file, "images do not decode or do not exist", "store PNG or JPEG images", column=col_name, rows=bad
            )
        rows.append(n)
    if not sum(rows):
        raise InputError(path, "no rows", "pass a non-empty input")
    import torch

    images = InlineImages(files, rows) if inline else values
    places = [(file, r, c) for file, n, c in zip(files, rows, columns) for r in range(n)]
    return PairSet(images, [], torch.arange(0), list(range(len(images))), str(path), places)


def read_ids(path) -> list | None:
    """Each row's id: the `id` column, else `image_id`, else None (the rows are their own ids)."""
    files = parquet_files(path)
    names = [parquet_schema(f).names for f in files]
    column = next((c for c in ("id", "image_id") if all(c in n for n in names)), None)
    if column is None:
        partly = next((c for c in ("id", "image_id") if any(c in n for n in names)), None)
        if partly is not None:
            raise lacks_column(next(f for f, n in zip(files, names) if partly not in n), partly)
        return None
    ids: list = []
    for file in files:
        col = _read_table(file, [column]).column(column)
        if col.null_count:
            raise InputError(
                file,
                "null ids",
                f"give every row an {column} (or drop the column)",
                column=column,
                rows=[i for i, v in enumerate(pc.is_null(col).to_pylist()) if v],
            )
        ids += col.to_pylist()
    return [str(i) for i in ids] if ids_as_text(files, column) else ids
