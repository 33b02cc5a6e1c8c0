"""Audit: every decision recorded durably before the tool runs, then its outcome."""
