"""`castellan sts`: serve the RFC 8693 token-exchange service (server/credentials/sts.py)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option("--config", "config_file", type=click.Path(path_type=Path, exists=True), required=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8760, show_default=True)
def sts(config_file: Path, host: str, port: int) -> None:
    """Serve token exchange (RFC 8693) for an identity provider that has none (docs/identity.md)."""
    import uvicorn

    from server.credentials.sts import StsSettings, build_sts_app
    from server.errors import ConfigError
    from server.logs import configure_logging

    try:
        app = build_sts_app(StsSettings.from_file(config_file))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    configure_logging("auto", "info")
    uvicorn.run(app, host=host, port=port, log_level="warning")
