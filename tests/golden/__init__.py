"""Golden numbers with provenance: stored JSON files and the recipes that regenerate them."""
