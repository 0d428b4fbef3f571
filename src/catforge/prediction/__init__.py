"""``--mode predict``: predictions of a test set, written in OCP's formats."""
