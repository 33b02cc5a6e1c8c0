"""Metering: rate limits, token budgets and loop detection per agent identity."""
