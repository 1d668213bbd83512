"""The `torchnode` command: the app and its commands, each defined in the module of its kind."""

from __future__ import annotations

import typer

from .cli_client import api, chat, generate
from .cli_serve import coordinator, dashboard_command, join
from .cli_swarm import check_evidence_command, identity, models_command, swarm

app = typer.Typer(help="Run large language models across volunteer machines.", no_args_is_help=True)
app.command()(join)
app.command()(coordinator)
app.command("dashboard")(dashboard_command)
app.command()(generate)
app.command()(chat)
app.command()(api)
app.command()(swarm)
app.command("models")(models_command)
app.command()(identity)
app.command("check-evidence")(check_evidence_command)


def main() -> None:
    app()
