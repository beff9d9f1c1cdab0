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

from xbtcore.search import GalleryIndex, Hit, digest_ids, id_key, normalise

ALIAS = "xbt-gallery"


def connect(target: str):
    """A Qdrant server URL (http://...) or a local folder (embedded mode)."""
    try:
        from qdrant_client import QdrantClient
    except ImportError as e:
        raise ValueError("--qdrant needs qdrant-client: pip install 'xbt[qdrant]'") from e

    return QdrantClient(url=target) if target.startswith(("http://", "https://")) else QdrantClient(path=target)


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
