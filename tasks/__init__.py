"""Prefect tasks of batchops: one I/O step each, thin wrappers over the core."""
