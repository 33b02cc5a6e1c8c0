"""The reference agent: how a real agent uses Castellan (`castellan-agent ask`, `castellan-agent eval`)."""
