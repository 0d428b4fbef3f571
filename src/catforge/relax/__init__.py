"""Batched ML relaxations (IS2RS)."""
