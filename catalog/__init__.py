"""The catalog: which data, embedding spaces, galleries and upgrades exist, in one DuckDB file."""

from .store import Catalog

__all__ = ["Catalog"]
