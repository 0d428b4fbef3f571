"""A trained potential and how it is measured: label transforms, metrics, checkpoints."""
