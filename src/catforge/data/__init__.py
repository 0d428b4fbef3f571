"""Data layer: atomic graphs, ASE conversion, neighbour search, LMDB storage, ingestion, demo."""
