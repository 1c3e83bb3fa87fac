"""The batchops command line (Typer + Rich): a top layer beside api/ and deployments/."""
