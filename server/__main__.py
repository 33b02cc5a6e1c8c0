"""`python -m server` runs the `castellan` command."""

from server.cli import main

if __name__ == "__main__":  # not when a worker process (catalog functions) imports the main module
    main()
