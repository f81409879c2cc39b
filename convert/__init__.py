"""Checkpoint I/O: reading the published layout, name mapping, format casts, sharding by plan, manifests, verification, synthetic checkpoints."""
