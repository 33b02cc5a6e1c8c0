"""Upstream MCP servers: their tools served under a namespace, governed like local ones, pinned."""
