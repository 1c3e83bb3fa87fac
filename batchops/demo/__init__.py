"""Demo resources and handlers that ship with the embedded default."""
