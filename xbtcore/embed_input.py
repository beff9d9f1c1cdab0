"""Inputs of `xbt embed`: one text or one image per Parquet row, in row order.

Unlike a corpus (deduplicated) or a pair set (grouped by image_id), a gallery
keeps every row: the output's `row` is the input row index.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.compute as pc

from .data import (
    InputError,
    PairSet,
    _is_bytes,
    _read_table,
    _schema,
    ids_as_text,
    is_text_type,
    lacks_column,
    parquet_files,
)

_IMAGE_FIX = "store images as 'image' (PNG/JPEG bytes) or 'image_path' (string) columns"


def read_texts(path, column: str = "caption") -> list[str]:
    texts: list[str] = []
    for file in parquet_files(path):
        schema = _schema(file)
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


def read_images(path) -> PairSet:
    """Every row's image as its own image of a PairSet (captions empty); paths resolved, decoding checked."""
    from .data import _check_decodes, image_column

    images: list = []
    places: list = []  # per image, (file, row, column): for errors
    for file in parquet_files(path):
        schema = _schema(file)
        col_name = image_column(file, schema)
        if col_name is None:
            texts = [n for n in schema.names if is_text_type(schema.field(n).type)]
            fix = f"it holds text ({', '.join(texts)}): embed it with --modality text" if texts else _IMAGE_FIX
            raise InputError(file, f"missing column 'image' or 'image_path'; the file has columns {schema.names}", fix)
        col = _read_table(file, [col_name]).column(col_name)
        if not (_is_bytes(col.type) if col_name == "image" else is_text_type(col.type)):
            raise InputError(file, f"has type {col.type}", _IMAGE_FIX, column=col_name)
        values = col.to_pylist()
        nulls = [r for r, v in enumerate(values) if v is None or v == ""]
        if nulls:
            raise InputError(
                file, "null images", "drop those rows or fill in their images", column=col_name, rows=nulls
            )
        if col_name == "image_path":
            folder = file.absolute().parent
            values = [os.path.normpath(folder / Path(v).expanduser()) for v in values]
        bad = [r for r, v in enumerate(values) if not _check_decodes(v)]
        if bad:
            raise InputError(
                file, "images do not decode or do not exist", "store PNG or JPEG images", column=col_name, rows=bad
            )
        images += values
        places += [(file, r, col_name) for r in range(len(values))]
    if not images:
        raise InputError(path, "no rows", "pass a non-empty input")
    import torch

    return PairSet(images, [], torch.arange(0), list(range(len(images))), str(path), places)


def read_ids(path) -> list | None:
    """Each row's id: the `id` column, else `image_id`, else None (the rows are their own ids)."""
    files = parquet_files(path)
    names = [_schema(f).names for f in files]
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
