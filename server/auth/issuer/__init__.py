"""The dev issuer: a local OAuth 2.1 authorization server for dev and demo mode (never production)."""
