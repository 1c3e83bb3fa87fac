"""batchops: batches of API operations as Prefect flows."""

__version__ = "0.1.0"
