"""The embedding cache: per-item lookups and engine calls for the misses (``embeddings.py``), keys (``keys.py``), and
the stores: in process, bounded by bytes, and shared in Redis (``store.py``)."""
