"""Authentication: bearer JWTs to `Identity`, and the HTTP edge that answers 401."""
