"""The `castellan` command. Each command group lives in its own module; this one assembles them."""

from __future__ import annotations

import click

from server.cli import approvals, audit, config, credentials, grants, policy, serve, sts, token, tools, usage


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="castellan")
def main() -> None:
    """Castellan: a governance-first MCP gateway."""
    from server.logs import configure_logging

    # Commands print their results on stdout; logs go to stderr, warnings and up (`serve` reconfigures).
    configure_logging("auto", "warning")


main.add_command(serve.serve)
main.add_command(serve.demo_data)
main.add_command(serve.connect)
main.add_command(serve.ship)
main.add_command(token.token)
main.add_command(config.check_config)
main.add_command(usage.usage)
main.add_command(audit.audit)
main.add_command(policy.policy)
main.add_command(grants.grants)
main.add_command(tools.tools)
main.add_command(approvals.approvals)
main.add_command(sts.sts)
main.add_command(credentials.credentials)
