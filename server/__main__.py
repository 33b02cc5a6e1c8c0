"""`python -m server` runs the `castellan` command."""

from server.cli import main

main()
