"""The gallery in Qdrant (qdrant-client): an index's vectors as a collection, served through an alias.

`QdrantClient(path=DIR)` is Qdrant's embedded local mode; a URL reaches a Qdrant server, for a gallery that
outgrows one machine. A collection holds one space's vectors, named after the space and the ids
(`xbt-SPACE-IDS`); the point id is the index row, the payload the item id. An alias (default `xbt-gallery`)
names the collection that answers; at the end of a backfill one `update_collection_aliases` call moves it
to the new space's collection, Qdrant's own atomic swap.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xbtcore.search import GalleryIndex, Hit, digest_ids, id_key, is_complete, normalise

ALIAS = "xbt-gallery"


def connect(target: str, existing: bool = False):
    """A Qdrant server URL (http://...) or a local folder (embedded mode; with `existing`, one that an export
    made: a read-only command does not create a mistyped folder)."""
    try:
        from qdrant_client import QdrantClient
    except ImportError as e:
        raise ValueError("--qdrant needs qdrant-client: pip install 'xbt[qdrant]'") from e

    if target.startswith(("http://", "https://")):
        return QdrantClient(url=target)
    if existing and not Path(target).is_dir():
        raise ValueError(f"--qdrant {target}: no such folder; export an index there with `xbt index ... --qdrant`")
    try:
        return QdrantClient(path=target)
    except RuntimeError as e:
        if "already accessed" not in str(e):
            raise
        raise ValueError(
            f"--qdrant {target} is held by another process (an embedded Qdrant folder takes one at a time): "
            "stop that one, or run a Qdrant server and pass its URL"
        ) from e


def collection_name(index: GalleryIndex) -> str:
    return f"xbt-{index.space}-{digest_ids(index.ids)[:8]}"


def export(index_dir: str | Path, client, alias: str | None = ALIAS, batch: int = 2048) -> str:
    """Copy a finished index into its collection (skipped when it is already whole) and, with `alias`,
    point the alias at it. -> the collection's name."""
    from qdrant_client import models

    index = GalleryIndex(index_dir)
    name = collection_name(index)
    vectors = index.vectors()  # (N, D)
    if client.collection_exists(name) and client.count(name, exact=True).count == len(index):
        pass
    else:
        if client.collection_exists(name):
            client.delete_collection(name)
        client.create_collection(
            name, vectors_config=models.VectorParams(size=index.dim, distance=models.Distance.DOT)
        )
        for start in range(0, len(index), batch):
            rows = range(start, min(start + batch, len(index)))
            client.upsert(
                name,
                points=models.Batch(
                    ids=list(rows),
                    vectors=vectors[start : rows.stop].tolist(),
                    payloads=[{"id": index.ids[r]} for r in rows],
                ),
            )
    if alias:
        point_alias(client, alias, name)
    return name


def point_alias(client, alias: str, collection: str) -> None:
    """Move (or create) `alias` to `collection` in one operation: a query sees the old or the new, never none."""
    from qdrant_client import models

    ops = []
    if any(a.alias_name == alias for a in client.get_aliases().aliases):
        ops.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias)))
    ops.append(
        models.CreateAliasOperation(create_alias=models.CreateAlias(collection_name=collection, alias_name=alias))
    )
    client.update_collection_aliases(change_aliases_operations=ops)


def aliased(client, alias: str = ALIAS) -> str | None:
    return next((a.collection_name for a in client.get_aliases().aliases if a.alias_name == alias), None)


def search(client, collection: str, query: np.ndarray, k: int) -> list[Hit]:
    """(D,) query -> top k hits, best first, ties by id (asks a little more than k so a tie at the cut is
    decided by id, as the faiss index does)."""
    q = normalise(query[None])[0].tolist()
    points = client.query_points(collection, query=q, limit=k + 16, with_payload=True).points
    hits = sorted((Hit(p.payload["id"], float(p.score)) for p in points), key=lambda h: (-h.score, id_key(h.id)))
    return hits[:k]


class QdrantIndex:
    """One collection, searched as xbtcore.search.GalleryIndex is; its ids and space are the index folder's
    it was exported from (point id = that index's row)."""

    def __init__(self, client, collection: str, index: GalleryIndex):
        self.client, self.collection, self.path = client, collection, index.path
        self.plan, self.space, self.dim = index.plan, index.space, index.dim
        self.ids, self.row_of = index.ids, index.row_of

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """(B, D) queries -> each one's top k, best first, ties by id."""
        return [search(self.client, self.collection, q, k) for q in np.atleast_2d(queries)]


class QdrantGallery:
    """The gallery `xbt serve --qdrant` searches: the collection the alias names. The alias on the index's
    own collection: its space, by the compatible query. The alias on the collection of the index's finished
    backfill (`xbt backfill --qdrant` moves it there): the new space alone, by the new model's query. A
    backfill under way is not in Qdrant, so this gallery is never mixed; the faiss index serves that.
    Same interface as xbtcore.backfill.MixedGallery, as serve.engine.Engine uses it."""

    def __init__(self, path: str | Path, client, alias: str = ALIAS):
        self.path = Path(path)
        self.old = GalleryIndex(self.path)
        name = aliased(client, alias)
        if name is None:
            raise ValueError(f"Qdrant has no alias {alias}: export the index first (`xbt index ... --qdrant`)")
        self.collection = name
        self.new_space, self.new_ids, self.complete = None, [], False
        backfill = self.path / "backfill"
        if name == collection_name(self.old):
            self.old = QdrantIndex(client, name, self.old)
        elif is_complete(backfill) and name == collection_name(new := GalleryIndex(backfill)):
            self.new = QdrantIndex(client, name, new)
            self.new_space, self.new_ids, self.complete = new.space, new.ids, True
        else:
            raise ValueError(
                f"Qdrant alias {alias} names the collection {name}, which holds neither index {self.path} "
                f"({collection_name(self.old)}) nor its finished backfill: export this index "
                f"(`xbt index ... --qdrant`) or serve the index that collection came from"
            )

    @property
    def fraction(self) -> float:
        return 1.0 if self.complete else 0.0

    def search(self, old_query: np.ndarray | None, new_query: np.ndarray | None, k: int) -> list[Hit]:
        if self.complete and new_query is not None:
            return self.search_new(new_query[None], k)[0]
        return self.old.search(old_query[None], k)[0]

    def prepare_scan(self, new: bool) -> None:
        """Nothing to prepare: Qdrant searches its own collection."""

    def search_new(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        return self.new.search(queries, k)
