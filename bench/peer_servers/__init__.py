"""Launch scripts for the peers `bench.peers` measures; each runs in its peer's own environment."""
