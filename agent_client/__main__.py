"""`python -m agent_client` runs `castellan-agent`."""

from agent_client.cli import main

if __name__ == "__main__":
    main()
