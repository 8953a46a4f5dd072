"""Compute backends of the LNSR step. `reference` is plain PyTorch and the oracle of every other backend."""
