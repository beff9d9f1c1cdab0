"""`xbt index` and `xbt backfill`: a gallery's inputs into xbtcore.search indexes.

The index keeps a reference to its source (the image or text Parquet, and each id's row there), so a
backfill can re-embed the gallery and the search page can show its images.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pyarrow.parquet as pq

from xbtcore.backfill import BACKFILL_ORDER, backfill_order
from xbtcore.data import InputError, parquet_files
from xbtcore.lock import exclusive
from xbtcore.search import (
    IDS,
    PLAN,
    build_index,
    check_finished,
    chunks_done,
    distinct_ids,
    is_complete,
    read_plan,
    refuse_other_files,
    remove_index,
)

ROWS_FILE = "source_rows.json"  # each stored id's row in the source
_WAIT = "wait for it to finish, or stop it"


def _is_embedding_parquet(path) -> bool:
    from xbtcore.data import parquet_schema  # an unreadable file: an InputError naming it and the fix

    return all("embedding" in parquet_schema(f).names for f in parquet_files(path))


def _bar(desc: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn(desc), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True)
    task = bar.add_task(desc, total=None)
    return bar, lambda done, total: bar.update(task, completed=done, total=total)


def check_gallery_space(source: str, model, modality: str) -> None:
    """An `xbt embed` output recorded in the catalog with another space than the model's compatible one, or
    another modality than `modality`, is refused."""
    from catalog import Catalog
    from tasks.common import state_dir

    recorded = Catalog(state_dir() / "catalog.duckdb").embeddings_at(source)
    if recorded is None:
        return
    if recorded["space"] and recorded["space"] != model.compat_space:
        raise ValueError(
            f"{source} was embedded in the space {recorded['space']} (by {recorded['model']}) "
            f"but {model.ref} queries the space {model.compat_space}: index it with a model of its space"
        )
    if recorded["modality"] and recorded["modality"] != modality:
        raise InputError(
            source,
            f"holds {recorded['modality']} embeddings (xbt embed --modality {recorded['modality']})",
            f"index it with --modality {recorded['modality']}",
        )


def read_items(source: str, modality: str, text_column: str = "caption"):
    """-> (per-row ids, items with a `[positions] -> embeddable batch` accessor) of an image or text Parquet."""
    from xbtcore.data import LazyImages
    from xbtcore.embed_input import read_ids, read_images, read_texts

    if modality == "text":
        texts = read_texts(source, text_column)
        ids = read_ids(source) or list(range(len(texts)))
        return ids, lambda enc, pos: enc.embed_texts([texts[p] for p in pos])
    images = read_images(source)
    ids = read_ids(source) or list(range(images.n_images))
    return ids, lambda enc, pos: enc.embed_images(LazyImages(images.subset(pos)))


def index_gallery(
    model,
    source: str,
    modality: str,
    out: str,
    text_column: str = "caption",
    images: str | None = None,
    chunk_rows: int = 4096,
    kind: str = "auto",
    stop_after: int | None = None,
) -> dict:
    """Embed a gallery (or take `xbt embed`'s vectors) into an index of the model's compatible space.

    model: serve.engine.QueryModel. images: for an embedding Parquet, the image/text Parquet it was made
    from (same ids), kept for backfills and thumbnails."""
    from tasks.common import digest, fingerprint_files
    from xbtcore.cache import fingerprint_model
    from xbtcore.data import read_gallery

    info = {"model": model.ref, "model_version": model.version, "modality": modality, "text_column": text_column}
    given_vectors = _is_embedding_parquet(source)
    # What a resumed index must be made of too: the model's files and the input files (name, size, mtime).
    embedder = None if given_vectors else fingerprint_model(model.resolved)
    files = [fingerprint_files(parquet_files(p)) for p in (source, images) if p]
    info["inputs"] = digest(embedder, text_column, *files)
    info["source_files"] = files[-1]  # of the image/text source: a backfill checks it is the same
    if given_vectors:
        check_gallery_space(source, model, modality)
        row_ids, emb = read_gallery(source)
        dim = model.compat.embed_dim
        if emb.shape[1] != dim:
            raise InputError(
                source,
                f"holds {emb.shape[1]}-d embeddings; {model.ref} queries in {dim}-d",
                "index it with the model that embedded it (or its upgrade bundle)",
                column="embedding",
            )
        positions, ids = distinct_ids(row_ids)
        vectors = emb.numpy()

        def embed(pos):
            return vectors[[positions[p] for p in pos]]

        info["embeddings"] = str(Path(source).absolute())
        if images:
            images_ids, _ = read_items(images, modality, text_column)
            info["source"] = str(Path(images).absolute())
            first = {i: r for r, i in reversed(list(enumerate(images_ids)))}
            missing = [i for i in ids if i not in first]
            if missing:
                raise InputError(
                    images, f"has no row for ids {missing[:5]}", "pass the input the embeddings came from"
                )
            source_rows = [first[i] for i in ids]
        else:
            source_rows = None
    else:
        row_ids, batch = read_items(source, modality, text_column)
        positions, ids = distinct_ids(row_ids)
        info["source"] = str(Path(source).absolute())
        info["precision"] = model.precision  # an embedding Parquet's vectors are taken as they are
        source_rows = positions

        def embed(pos):
            return batch(model.compat, [positions[p] for p in pos]).numpy()

    refuse_other_files(out)  # before the lock file goes there
    bar, progress = _bar("index")
    with bar, exclusive(out, "xbt index", _WAIT):
        extra = {ROWS_FILE: source_rows} if source_rows is not None else None
        path = build_index(out, ids, embed, model.compat_space, info, chunk_rows, kind, progress, stop_after, extra)
    return {"out": str(path), "items": len(ids), "space": model.compat_space, "complete": is_complete(path)}


def _writes_index(command: str):
    """fn(index, ...), run as `command`, with the finished index folder locked while it writes there."""

    def wrap(fn):
        @functools.wraps(fn)
        def locked(index, *args, **kwargs):
            check_finished(index)
            with exclusive(index, command, _WAIT):
                return fn(index, *args, **kwargs)

        return locked

    return wrap


@_writes_index("xbt backfill")
def backfill(
    index: str,
    model,
    order: str | None = None,
    chunk_rows: int = 1024,
    seed: int = 0,
    stop_after: int | None = None,
) -> dict:
    """Re-embed the gallery with the model's own (new) space into INDEX/backfill, in `order`, chunk by chunk.
    Resumable: a rerun continues at the first missing chunk. model: serve.engine.QueryModel.

    order None: "learned" where the model is an upgrade's bundle holding a gain model (fitted for text
    queries over an image gallery) and the index holds images, else BACKFILL_ORDER."""
    from xbtcore.bundle import is_bundle, read_gain
    from xbtcore.search import GalleryIndex

    old = GalleryIndex(index)
    plan = old.plan
    if "source" not in plan or not (Path(index) / ROWS_FILE).is_file():
        raise ValueError(
            f"{index}: the index keeps no gallery source to re-embed; rebuild it with "
            "`xbt index --input` the image/text Parquet (or --images with an embedding Parquet)"
        )
    if model.own_space == old.space:
        raise ValueError(f"{index} is already in the space {old.space} of {model.ref}: nothing to backfill")
    bf = Path(index) / "backfill"
    if (bf / PLAN).is_file() and read_plan(bf)["space"] != model.own_space:
        raise ValueError(
            f"{bf} holds a backfill into another space ({read_plan(bf)['space']}): remove it "
            f"(`xbt backfill --index {index} --discard`) before backfilling to {model.own_space}"
        )
    if (bf / IDS).is_file():  # resuming: the order and chunk size fixed when the backfill started
        ordered = json.loads((bf / IDS).read_text())
        started = read_plan(bf)
        if order is not None and order != started.get("order"):
            raise ValueError(
                f"{bf} was started in the order {started.get('order')}: resume it without --order (or with "
                f"--order {started.get('order')}), or discard it (`xbt backfill --index {index} --discard`) to "
                f"start again in the order {order}"
            )
        order, chunk_rows = started.get("order"), started["chunk_rows"]
    else:
        gain = read_gain(model.resolved) if order in (None, "learned") and is_bundle(model.resolved) else None
        if order is None:
            order = "learned" if gain is not None and plan["modality"] == "image" else BACKFILL_ORDER
        if order == "learned" and plan["modality"] != "image":
            raise ValueError(
                f"{index} holds texts and the learned order is fitted for an image gallery: choose another --order"
            )
        ordered = [old.ids[r] for r in backfill_order(old.vectors(), order, seed, gain)]
    source_rows = json.loads((Path(index) / ROWS_FILE).read_text())
    batch = _source_of(index, plan, old.ids, source_rows)
    encoder = model.own()

    def embed(pos):
        return batch(encoder, [source_rows[old.row_of[ordered[p]]] for p in pos]).numpy()

    info = {
        "model": model.ref,
        "model_version": model.version,
        "modality": plan["modality"],
        "order": order,
        "source": plan["source"],
        "text_column": plan.get("text_column", "caption"),
        "old_space": old.space,
        "precision": model.precision,
    }
    bar, progress = _bar("backfill")
    with bar:
        extra = {ROWS_FILE: [source_rows[old.row_of[i]] for i in ordered]}
        restart = f"discard it (`xbt backfill --index {index} --discard`)"
        build_index(
            bf, ordered, embed, model.own_space, info, chunk_rows, "auto", progress, stop_after, extra, restart
        )
    return backfill_status(index)


def _source_of(index: str, plan: dict, ids: list, source_rows: list):
    """The index's gallery source as read_items gives it, checked to hold each id of the index at the row
    the index recorded for it: a source rewritten since (other rows, another order) would have the backfill
    embed other items under those ids."""
    source, modality = plan["source"], plan["modality"]
    fix = f"restore the gallery source the index was built from, or rebuild the index with `xbt index --out {index}`"
    try:
        _, batch = read_items(source, modality, plan.get("text_column", "caption"))
        moved = _moved(plan, zip(source_rows, ids))
    except InputError as e:
        raise ValueError(f"{index}: its gallery source cannot be read ({e}): {fix}") from e
    if moved is True:
        raise ValueError(f"{index}: its gallery source {source} changed since the index was built: {fix}")
    if moved:
        raise ValueError(f"{index}: its gallery source {source} no longer holds ids {moved[:3]} where it did: {fix}")
    return batch


def _moved(plan: dict, rows_and_ids) -> list | bool:
    """Of (row, id) pairs the index recorded, the ids its source no longer holds at their row; True where
    the source has no id column (a row's number is its id, which a reordered source keeps) and its files
    changed since the index was built. An InputError where the source is gone or unreadable."""
    from tasks.common import fingerprint_files

    files = fingerprint_files(parquet_files(plan["source"]))
    ids = _ids_of(plan["source"], files)
    if ids is None:
        return plan.get("source_files") not in (None, files)
    return [i for r, i in rows_and_ids if r >= len(ids) or ids[r] != i]


def backfill_status(index: str) -> dict:
    """A backfill's progress; before one starts, every item of the index waits in the index's own space."""
    check_finished(index)
    bf = Path(index) / "backfill"
    own = read_plan(index)
    if not (bf / PLAN).is_file() and "old_space" in own:  # --remove-old left the backfill in the index's place
        return {
            "index": str(index),
            "space": own["space"],
            "old_space": own["old_space"],
            "order": own.get("order"),
            "backfilled": own["n"],
            "items": own["n"],
            "fraction": 1.0,
            "complete": True,
            "old_removed": True,
        }
    if not (bf / PLAN).is_file():
        plan, done = {"space": None, "old_space": own["space"], "order": None, "n": own["n"]}, 0
    else:
        plan = read_plan(bf)
        done = min(plan["n"], len(chunks_done(bf)) * plan["chunk_rows"])
    return {
        "index": str(index),
        "space": plan["space"],
        "old_space": plan.get("old_space"),
        "order": plan.get("order"),
        "backfilled": done,
        "items": plan["n"],
        "fraction": round(done / max(1, plan["n"]), 4),
        "complete": is_complete(bf),
        "old_removed": False,
    }


def _swap_paths(index: Path) -> tuple[Path, Path]:
    """Where --remove-old stages the finished backfill and, where the folders cannot be exchanged in one
    step, keeps the old index until the swap is done: hidden names of xbt's own beside INDEX."""
    return index.with_name(f".{index.name}.xbt-backfilled"), index.with_name(f".{index.name}.xbt-retired")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders' names in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:
        return False
    import errno

    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # this file system or kernel cannot exchange
        return False
    raise OSError(code, os.strerror(code), str(a))


def _finish_interrupted_removal(index: Path) -> bool:
    """Put right what a --remove-old killed midway left: the staged backfill back into INDEX (killed before
    the swap), or the swap completed and the old index removed (killed after it); -> whether the removal
    is now complete."""
    staged, retired = _swap_paths(index)
    if staged.is_dir() and not index.exists() and retired.is_dir():  # between the two renames of the fallback
        os.replace(staged, index)
    finished = False
    if staged.is_dir() and index.is_dir():
        if "old_space" in read_plan(index):  # exchanged: `staged` holds the old index
            remove_index(staged)
            finished = True
        elif not (index / "backfill").exists():  # staged, not yet exchanged
            os.replace(staged, index / "backfill")
    if retired.is_dir() and index.is_dir():
        remove_index(retired)
        finished = True
    return finished


def remove_old(index: str) -> dict:
    """After a finished backfill: the new-space index takes the old one's place, and the old vectors go.
    A kill at any point leaves INDEX an index (the old one with its backfill, or the new one, but for the
    instant between two renames where the system cannot exchange folders), and the next run finishes."""
    if not Path(index).exists() and _finish_interrupted_removal(Path(index)):
        return _holds(index)
    return _remove_old(index)


def _holds(index) -> dict:
    return {"index": str(index), "space": read_plan(index)["space"]}


@_writes_index("xbt backfill --remove-old")
def _remove_old(index: str) -> dict:
    index = Path(index)
    if _finish_interrupted_removal(index):
        return _holds(index)
    bf = index / "backfill"
    own = read_plan(index)
    if not (bf / PLAN).is_file() and "old_space" in own:  # the plan of a backfill that replaced its old index
        raise ValueError(f"{index} already holds the new space {own['space']} only: nothing to remove")
    if not is_complete(bf):
        raise ValueError(
            f"{index}: the backfill is not finished ({backfill_status(str(index))['fraction']:.0%}); "
            "run `xbt backfill` again to finish it before removing the old index"
        )
    staged, retired = _swap_paths(index)
    for leftover in (staged, retired):
        if leftover.exists():  # not left by a removal of this index (_finish_interrupted_removal took those)
            raise ValueError(f"{leftover} is in the way of the swap: move it elsewhere and run --remove-old again")
    os.replace(bf, staged)
    if _exchange(staged, index):
        remove_index(staged)  # now the old index
    else:
        os.replace(index, retired)
        os.replace(staged, index)
        remove_index(retired)
    return _holds(index)


@_writes_index("xbt backfill --discard")
def discard_backfill(index: str) -> bool:
    """Drop INDEX/backfill; -> whether there was one."""
    bf = Path(index) / "backfill"
    if not bf.exists():
        return False
    remove_index(bf)
    return True


def source_item(index: str, row: int, item_id=None) -> tuple[bytes, str] | None:
    """The source image bytes (and media type) of the index's row, or None when it keeps no image source,
    or (given the row's `item_id`) when the source no longer holds that id at the recorded row."""
    plan = read_plan(index)
    rows_file = Path(index) / ROWS_FILE
    if plan.get("modality") != "image" or "source" not in plan or not rows_file.is_file():
        return None
    source, at = plan["source"], json.loads(rows_file.read_text())[row]
    if item_id is not None:
        try:
            if _moved(plan, [(at, item_id)]):
                return None
        except InputError:  # gone, or no longer readable (null ids): nothing to show
            return None
    return _image_at(source, at)


@functools.lru_cache(maxsize=8)
def _ids_of(source: str, files_fingerprint: str) -> list | None:
    """The source's id column (None without one), read once per version of its files."""
    from xbtcore.embed_input import read_ids

    return read_ids(source)


def _image_at(source: str, row: int) -> tuple[bytes, str] | None:
    for f in parquet_files(source):
        n = pq.read_metadata(f).num_rows
        if row >= n:
            row -= n
            continue
        names = pq.read_schema(f).names
        col = "image" if "image" in names else "image_path"
        value = pq.read_table(f, columns=[col]).column(col)[row].as_py()
        if col == "image_path":
            value = (f.absolute().parent / value).read_bytes()
        kind = "image/png" if value[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg"
        return value, kind
    return None
