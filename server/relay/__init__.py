"""Relay of server-to-client traffic (sampling, elicitation, roots, logs, progress) raised during a call."""
