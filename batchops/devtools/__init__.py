"""Tools for developing and testing batchops (not used by the service itself)."""
