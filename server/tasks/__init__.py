"""Tasks: long-running calls that the caller polls (the `io.modelcontextprotocol/tasks` extension)."""
