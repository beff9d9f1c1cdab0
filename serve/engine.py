"""What answers a query: a model REF loaded as query encoders, an index, and the swap between versions.

A model has two spaces. Its compatible space is where its queries can search without re-embedding: a
bundle's root old model (the gallery's model, through every link of a chain), a plain model's own. Its own
space is where its unmodified encoder embeds: a bundle's base new model, a plain model's own. An index
is searched in its own space only; the mixed gallery of a backfill uses both.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xbtcore.backfill import MixedGallery, state_of
from xbtcore.search import BATCH_WAIT_S, Hit, MicroBatcher, cores

log = logging.getLogger("xbt.serve")


def one_thread_per_request() -> None:
    """A query's forward pass and a lone search run on one thread: the requests in flight are the
    concurrency. A batch's scan (Engine._search_texts, one at a time) uses every core."""
    import faiss
    import torch

    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)


class SpaceMismatch(ValueError):
    """A model whose queries live in another space than the index's."""


@dataclass
class QueryModel:
    ref: str  # as given (models:/NAME@champion stays an alias)
    resolved: str  # a local folder or hub id
    version: str  # the registry version, or the model's fingerprint
    compat_space: str
    own_space: str
    compat: object  # encoder into compat_space
    own_loader: object = None  # () -> encoder into own_space, loaded on first use
    precision: str = "fp32"  # what both encoders embed at (encoders.PRECISIONS)
    _own: object = field(default=None, repr=False)

    def own(self):
        if self._own is None:
            self._own = self.compat if self.own_loader is None else self.own_loader()
        return self._own


def load_query_model(
    ref: str, device: str = "cpu", precision: str = "fp32", compile_after: int | None = None
) -> QueryModel:
    """A model REF (HF id or folder, bundle, models:/ URI) -> its encoders and spaces, on `device` at
    `precision` (encoders.PRECISIONS), their passes torch.compile'd once each has embedded `compile_after`
    items (an index's or a backfill's, as encoders.resolve_compile settles --compile; queries are not)."""
    from tasks.common import absolute_ref
    from tasks.registry import pinned_ref, resolve_ref, space_of
    from xbtcore.bundle import is_bundle, load_compatible, original_encoder, read_meta
    from xbtcore.cache import fingerprint_model
    from xbtcore.encoders import PRECISIONS, DualEncoder

    on = {"device": device, "dtype": PRECISIONS[precision]}
    resolved = absolute_ref(resolve_ref(ref))
    pinned = pinned_ref(ref, resolved)
    version = pinned.rsplit("/", 1)[1] if pinned.startswith("models:/") else fingerprint_model(resolved)[:8]

    def compiled(encoder):
        encoder.compile_after = compile_after
        return encoder

    if is_bundle(resolved):
        meta = read_meta(resolved)
        compat = compiled(load_compatible(resolved, **on)[0])
        return QueryModel(
            ref,
            resolved,
            version,
            space_of(meta.root_model),
            space_of(meta.base_model),
            compat,
            lambda: compiled(original_encoder(Path(resolved), meta, **on)),
            precision,
        )
    encoder = compiled(DualEncoder.from_pretrained(resolved, **on))
    space = space_of(resolved)
    return QueryModel(ref, resolved, version, space, space, encoder, precision=precision)


def current_version(ref: str) -> str | None:
    """The version a models:/NAME@ALIAS points at now (one registry call); None for any other REF."""
    import re

    m = re.fullmatch(r"models:/([^/@]+)@([^/]+)", str(ref))
    if not m:
        return None
    from tasks.registry import client

    return str(client().get_model_version_by_alias(*m.groups()).version)


def embed_query(encoder, text: str | None = None, image=None) -> np.ndarray:
    """One text or one PIL image -> (D,) unit vector."""
    emb = encoder.embed_texts([text]) if text is not None else encoder.embed_images([image])
    return emb[0].float().numpy()


class Engine:
    """One model version against one state of the gallery; never changes once built (a swap builds another)."""

    def __init__(self, model: QueryModel, gallery: MixedGallery, batch_wait_s: float = BATCH_WAIT_S):
        index_space = gallery.old.space
        finished_in_own = gallery.complete and gallery.new_space == model.own_space  # no adapter needed
        if index_space not in (model.compat_space, model.own_space) and not finished_in_own:
            raise SpaceMismatch(
                f"model {model.ref} queries the space {model.compat_space} but index {gallery.path} holds "
                f"{index_space}: serve it with a model of that space (or an upgrade bundle of its model)"
            )
        self.model, self.gallery = model, gallery
        # The old part: the index's own space. A backfill counts only when it is this model's own space.
        self.old_encoder = model.own() if index_space == model.own_space else model.compat
        mixed = gallery.new_space is not None and gallery.new_space == model.own_space != index_space
        self.new_encoder = model.own() if mixed else None
        self.searches_old = not (mixed and gallery.complete)
        # Concurrent text queries share one forward pass of each encoder and one scan of the index
        # (xbtcore.search.MicroBatcher). One space answers unless a backfill is under way.
        self._single = None
        if self.new_encoder is None:
            self._single = (self.old_encoder, gallery.old.search)
        elif not self.searches_old:
            self._single = (self.new_encoder, gallery.search_new)
        if self._single is not None:  # one index searched whole: int8 codes make its scan faster, same answer
            gallery.prepare_scan(new=self.new_encoder is not None)
        self.text_batches = MicroBatcher(self._search_texts, wait_s=batch_wait_s)
        if self.searches_old:
            dim = embed_query(self.old_encoder, text="a").shape[0]
            if dim != gallery.old.dim:
                raise SpaceMismatch(
                    f"model {model.ref} gives {dim}-d queries; index {gallery.path} holds {gallery.old.dim}-d"
                )

    @property
    def space(self) -> str:
        if self.new_encoder is not None and not self.searches_old:
            return self.gallery.new_space
        if self.new_encoder is not None:
            return f"{self.gallery.old.space}+{self.gallery.new_space}"
        return self.gallery.old.space

    def _search_texts(self, items: list[tuple[str, int]]) -> list[list[Hit]]:
        """[(text, k)] -> each text's top k, from one forward pass (of each encoder, under a backfill) and
        one search of the index."""
        import faiss

        texts, most = [t for t, _ in items], max(k for _, k in items)
        faiss.omp_set_num_threads(cores())  # OpenMP's setting is per thread: this batch's leader's
        if self._single is not None:
            encoder, search = self._single
            hits = search(encoder.embed_texts(texts).float().numpy(), most)  # queries (B, D)
        else:  # a backfill under way: the compatible query and the new model's own, merged
            old_q = self.old_encoder.embed_texts(texts).float().numpy()  # (B, D_old)
            new_q = self.new_encoder.embed_texts(texts).float().numpy()  # (B, D_new)
            hits = self.gallery.search_many(old_q, new_q, most)
        return [h[:k] for h, (_, k) in zip(hits, items)]

    def search(self, k: int, text: str | None = None, image=None) -> dict:
        if text is not None:
            hits = self.text_batches.submit((text, k))
        else:
            old_q = embed_query(self.old_encoder, text, image) if self.searches_old else None
            new_q = embed_query(self.new_encoder, text, image) if self.new_encoder is not None else None
            hits = self.gallery.search(old_q, new_q, k)
        return {
            "model": self.model.ref,
            "model_version": self.model.version,
            "space": self.space,
            "results": [{"id": h.id, "score": round(h.score, 6)} for h in hits],
        }

    def describe(self) -> dict:
        return {
            "model": self.model.ref,
            "model_version": self.model.version,
            "space": self.space,
            "index": str(self.gallery.path),
            "items": len(self.gallery.old),
            # 1.0 for an index a finished backfill replaced (`xbt backfill --remove-old`)
            "backfilled": round(self.gallery.fraction, 4)
            if self.new_encoder is not None
            else float("old_space" in self.gallery.old.plan),
            "text_batches": self.text_batches.batches,
            "text_queries_batched": self.text_batches.items,
        }


class Server:
    """Holds the engine that answers; `refresh` builds the next one beside it and swaps one reference.

    A request reads `self.engine` once, so it finishes on the engine it started with even when a swap
    lands meanwhile: no request fails across a swap. A failed refresh keeps the current engine.
    """

    def __init__(
        self, ref: str, index: str | Path, poll_s: float = 5.0, qdrant=None, batch_wait_s: float = BATCH_WAIT_S
    ):
        """qdrant: a qdrant-client client: the gallery is the collection its alias names (serve.qdrant)."""
        self.ref, self.index, self.poll_s, self.qdrant = ref, Path(index), poll_s, qdrant
        self.batch_wait_s = batch_wait_s
        self.engine = Engine(load_query_model(ref), self._open_gallery(), batch_wait_s)
        self._gallery_state = self._state()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.swaps = 0
        self.last_error: str | None = None

    def _open_gallery(self):
        if self.qdrant is None:
            return MixedGallery(self.index)
        from .qdrant import QdrantGallery

        return QdrantGallery(self.index, self.qdrant)

    def _state(self) -> tuple:
        """What a gallery reopens on: the index and its backfill; from Qdrant, the collection its alias names."""
        if self.qdrant is None:
            return state_of(self.index)
        from .qdrant import aliased

        return (aliased(self.qdrant),)

    def refresh(self) -> bool:
        """Re-resolve the alias and re-read the backfill; swap if either moved. -> whether it swapped."""
        current = self.engine
        version = current_version(self.ref)
        model = current.model
        if version is not None and version != model.version:
            model = load_query_model(self.ref)
        gallery_state = self._state()
        if model is current.model and gallery_state == self._gallery_state:
            return False
        gallery = self._open_gallery() if gallery_state != self._gallery_state else current.gallery
        self.engine = Engine(model, gallery, self.batch_wait_s)  # the swap: one reference assignment
        self._gallery_state = gallery_state
        self.swaps += 1
        log.info("now serving %s version %s on %s", model.ref, model.version, self.engine.space)
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.refresh()
                self.last_error = None
            except Exception as e:  # keep answering with the engine we have
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("refresh failed, still serving version %s: %s", self.engine.model.version, e)

    def start(self) -> None:
        if self.poll_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="xbt-refresh", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
