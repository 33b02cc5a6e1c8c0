"""The web console under `/console`: audit search, charts, catalog and approvals for the people who
govern agents, behind the gateway's own token verification (docs/console.md)."""
