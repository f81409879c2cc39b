"""Checkpoint I/O: reading the published layout, name mapping, format casts, sharding by plan, manifests, verification, synthetic checkpoints."""

from convert.errors import ConvertError
from convert.manifest import load_rank

__all__ = ["ConvertError", "load_rank"]
