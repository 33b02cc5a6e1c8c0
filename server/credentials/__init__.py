"""Upstream credentials: static secrets, RFC 8693 token exchange, brokered per-user grants."""
