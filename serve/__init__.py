"""The search service: `xbt serve`'s HTTP API and page over an xbtcore.search index."""
