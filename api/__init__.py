"""The batchops HTTP API (FastAPI): ``api.main:app``, or ``api.main.run()``."""
