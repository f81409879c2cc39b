"""Checkpoint I/O: reading the published layout, name mapping, format casts, sharding by plan, manifests,
verification, synthetic checkpoints. `load_rank(out_dir, rank)` gives a converted rank's state dict."""

from convert.errors import ConvertError
from convert.manifest import load_rank

__all__ = ["ConvertError", "load_rank"]
