"""On-disk embedding cache: frozen encoders embed a dataset once.

An entry is keyed by (model fingerprint, data fingerprint, modality) and stored
as safetensors shards plus a manifest. Shards are written atomically and a
finished shard is never recomputed, so a crashed embedding job resumes where it
stopped; the entry is complete when every shard exists. Under torchrun each
rank embeds the shards i with i % world_size == rank.

φ pretraining and the Eqn. 6 baselines read embeddings from here and load no
encoder at all. `cached_text_embeddings` / `cached_image_embeddings` are the
one way a frozen encoder's embeddings of a dataset reach the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .ddp import world_info

SHARD_ROWS = 16_384
TEXT_BATCH = 512  # texts per forward pass when a frozen encoder fills the cache


def fingerprint_texts(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


def fingerprint_items(items: Sequence) -> str:
    """Fingerprint of images given as bytes or paths (paths hash name, size and mtime)."""
    h = hashlib.sha256()
    for it in items:
        if isinstance(it, (bytes, bytearray)):
            h.update(hashlib.sha1(it).digest())
        else:
            st = os.stat(it)
            h.update(f"{it}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


MODEL_FILES = {".json", ".safetensors", ".bin", ".txt", ".model"}
_DIGESTS: dict[tuple, str] = {}


def file_digest(f: Path) -> str:
    """sha256 of a file's whole content, computed once per (path, size, mtime, inode): in this process,
    and across processes under $XBT_STATE_DIR/digests where that is set (the CLI always sets it), so
    a multi-GB checkpoint is read in full once, not by every `xbt search`."""
    st = f.stat()
    key = (str(f.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key in _DIGESTS:
        return _DIGESTS[key]
    memo = None
    if os.environ.get("XBT_STATE_DIR"):
        name = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]
        memo = Path(os.environ["XBT_STATE_DIR"]) / "digests" / name
        if memo.is_file():
            _DIGESTS[key] = memo.read_text().strip()
            return _DIGESTS[key]
    h = hashlib.sha256()
    with f.open("rb") as fh:
        for block in iter(lambda: fh.read(8 << 20), b""):
            h.update(block)
    _DIGESTS[key] = h.hexdigest()
    if memo is not None:
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
            tmp.write_text(_DIGESTS[key])
            os.replace(tmp, memo)
        except OSError:
            pass  # a read-only state folder costs a re-read next time, nothing else
    return _DIGESTS[key]


def fingerprint_model(ref: str, with_mtime: bool = False) -> str:
    """Fingerprint of a model: a hub id is its name; a local directory is its config, weight and
    tokenizer files.

    Without with_mtime (a gallery space's id, a model version): each file's name in the folder and
    whole content (its digest memoised by file_digest), not where the folder is, so two checkpoints
    that differ anywhere get other ids, and the same files are one id however their path is spelled,
    copied or touched. With with_mtime (the embedding cache's key, computed on every pass): the path
    and each file's size, modification time and first and last MiB, which sees a rewrite without
    reading a large file in full."""
    p = Path(ref)
    h = hashlib.sha256(b"files" if p.is_dir() and not with_mtime else str(ref).encode())
    if p.is_dir():
        for f in sorted(p.rglob("*")):
            if not (f.is_file() and f.suffix in MODEL_FILES):
                continue
            st = f.stat()
            h.update(f"{f.relative_to(p)}|{st.st_size}".encode())
            if not with_mtime:
                h.update(file_digest(f).encode())
                continue
            h.update(f"|{st.st_mtime_ns}".encode())
            with f.open("rb") as fh:
                h.update(fh.read(1 << 20))
                if st.st_size > 2 << 20:
                    fh.seek(-(1 << 20), os.SEEK_END)
                    h.update(fh.read())
    return h.hexdigest()[:16]


@dataclass
class CacheStats:
    computed_rows: int = 0
    reused_rows: int = 0


class EmbeddingCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def entry_dir(self, model_fp: str, data_fp: str, modality: str) -> Path:
        return self.root / f"{modality}-{model_fp}-{data_fp}"

    def is_complete(self, model_fp: str, data_fp: str, modality: str) -> bool:
        m = self.entry_dir(model_fp, data_fp, modality) / "manifest.json"
        return m.exists() and json.loads(m.read_text()).get("complete", False)

    def get_or_compute(
        self,
        model_fp: str,
        data_fp: str,
        modality: str,
        n_rows: int,
        embed: Callable[[int, int], torch.Tensor],
        meta: dict | None = None,
        shard_rows: int = SHARD_ROWS,
        stats: CacheStats | None = None,
    ) -> torch.Tensor:
        """Return the (n_rows, D) embeddings, computing only the missing shards.

        embed(start, stop) -> (stop - start, D) float32 embeddings of those rows.
        """
        d, info = self.open_entry(model_fp, data_fp, modality, n_rows, meta, shard_rows)
        n_shards = info["shards"]
        rank, world = world_info()
        for i in range(n_shards):
            start, stop = i * shard_rows, min((i + 1) * shard_rows, n_rows)
            if self.shard_path(d, i).exists():
                if stats:
                    stats.reused_rows += stop - start
                continue
            if i % world != rank:
                continue
            self.write_shard(d, i, embed(start, stop), stop - start)
            if stats:
                stats.computed_rows += stop - start
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
        out = torch.cat([load_file(self.shard_path(d, i))["embedding"] for i in range(n_shards)])
        if rank == 0:
            info["complete"], info["dim"] = True, int(out.shape[1]) if out.ndim == 2 else 0
            _atomic_write_text(d / "manifest.json", json.dumps(info, indent=2))
        return out

    def open_entry(
        self, model_fp: str, data_fp: str, modality: str, n_rows: int, meta: dict | None, shard_rows: int
    ) -> tuple[Path, dict]:
        """The entry's folder, its manifest written if new -> (folder, manifest). An entry of another size is
        a RuntimeError naming it."""
        d = self.entry_dir(model_fp, data_fp, modality)
        d.mkdir(parents=True, exist_ok=True)
        manifest = d / "manifest.json"
        n_shards = max(1, -(-n_rows // shard_rows))
        info = {
            "model": model_fp,
            "data": data_fp,
            "modality": modality,
            "rows": n_rows,
            "shard_rows": shard_rows,
            "shards": n_shards,
            "complete": False,
            **(meta or {}),
        }
        if manifest.exists():
            old = json.loads(manifest.read_text())
            if old.get("rows") != n_rows or old.get("shard_rows") != shard_rows:
                raise RuntimeError(
                    f"cache entry {d} has {old.get('rows')} rows, expected {n_rows}: delete it and rerun"
                )
        else:
            _atomic_write_text(manifest, json.dumps(info, indent=2))
        return d, info

    @staticmethod
    def shard_path(entry: Path, i: int) -> Path:
        return entry / f"shard-{i:05d}.safetensors"

    def write_shard(self, entry: Path, i: int, emb: torch.Tensor, rows: int) -> None:
        """Shard i of an entry, written atomically: a killed job leaves no half shard. emb: (rows, D)."""
        emb = emb.float().contiguous()
        assert emb.shape[0] == rows, f"shard {i} has {emb.shape[0]} rows, expected {rows}"
        path = self.shard_path(entry, i)
        tmp = path.with_suffix(".tmp")
        save_file({"embedding": emb}, tmp)
        os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def cache_model_key(encoder) -> str:
    """The cache's model key: a compatible encoder (a bundle's, `compatible=True`) embeds into the
    old space, so it is keyed apart from its base model; bf16 passes apart from float32 ones."""
    bf16 = getattr(encoder, "dtype", torch.float32) == torch.bfloat16  # keyed apart from float32's
    return (
        fingerprint_model(encoder.ref, with_mtime=True)
        + ("-bf16" if bf16 else "")
        + ("-compat" if getattr(encoder, "compatible", False) else "")
    )


def cached_text_embeddings(
    cache: EmbeddingCache,
    encoder,
    texts: list[str],
    progress=False,
    stats=None,
    batch_size=TEXT_BATCH,
    shard_rows=SHARD_ROWS,
):
    """(N, D) embeddings of `texts` by a frozen encoder, through the cache."""
    return cache.get_or_compute(
        cache_model_key(encoder),
        fingerprint_texts(texts),
        "text",
        len(texts),
        lambda a, b: encoder.embed_texts(texts[a:b], batch_size=batch_size, progress=progress),
        meta={"model_ref": encoder.ref},
        shard_rows=shard_rows,
        stats=stats,
    )


def cached_image_embeddings(cache: EmbeddingCache, encoder, pairs, progress=False, stats=None, batch_size=256):
    """(N_images, D) embeddings of a PairSet's distinct images by a frozen encoder, through the cache."""
    from .data import LazyImages

    return cache.get_or_compute(
        cache_model_key(encoder),
        fingerprint_items(pairs.images),
        "image",
        pairs.n_images,
        lambda a, b: encoder.embed_images(LazyImages(pairs, a, b), batch_size=batch_size, progress=progress),
        meta={"model_ref": encoder.ref},
        stats=stats,
    )


def gallery_key(gallery, image_ids) -> str:
    """The model key's suffix for old image embeddings taken from a stored gallery: which of its rows stand
    in for which image hangs on the images' ids as much as on the gallery."""
    ids = hashlib.sha256("\x00".join(map(str, image_ids)).encode()).hexdigest()[:16]
    return f"-gallery-{gallery.fingerprint}-ids-{ids}"


def cached_old_image_embeddings(cache: EmbeddingCache, encoder, pairs, gallery=None, progress=False, stats=None):
    """(N_images, D) old-model embeddings of a PairSet's distinct images, through the cache: from the stored
    gallery (data.Gallery) where it holds an image's id, by the old encoder for the rest.
    -> (embeddings, how many images the gallery held)."""
    if gallery is None:
        return cached_image_embeddings(cache, encoder, pairs, progress, stats), 0
    positions, stored = gallery.lookup(pairs.image_ids)  # (n_found,), (n_found, D)
    assembled: list[torch.Tensor] = []  # the whole (N_images, D) tensor, made on the first shard's request

    def assemble(a: int, b: int) -> torch.Tensor:
        if not assembled:
            missing = sorted(set(range(pairs.n_images)) - set(positions))
            rest = cached_image_embeddings(cache, encoder, pairs.subset(missing), progress, stats) if missing else None
            out = torch.empty(pairs.n_images, stored.shape[1] if positions else rest.shape[1])
            if positions:
                out[positions] = F.normalize(stored.float(), dim=-1)
            if missing:
                out[missing] = rest
            assembled.append(out)
        return assembled[0][a:b]

    key = cache_model_key(encoder) + gallery_key(gallery, pairs.image_ids)
    emb = cache.get_or_compute(
        key,
        fingerprint_items(pairs.images),
        "image",
        pairs.n_images,
        assemble,
        meta={"model_ref": encoder.ref, "gallery": gallery.path},
        stats=stats,
    )
    return emb, len(positions)
