"""Training: losses, label normalisation, element references, optimizer, LR schedule, EMA."""
