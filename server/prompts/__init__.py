"""Prompts the gateway serves from its upstreams, each governed as a catalog function."""
