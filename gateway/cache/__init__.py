"""The embedding cache: keys, an in-process store bounded by bytes, and a shared Redis store."""
