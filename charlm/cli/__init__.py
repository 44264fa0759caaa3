"""The ``charlm`` command: the only place that knows about typer and rich."""

from charlm.cli.commands import app, main

__all__ = ["app", "main"]
