"""The `nenni` command tree: one module per command, shared option groups in `options`."""

from __future__ import annotations

import importlib

import click

from .. import __version__
from ..errors import NenniError

# Each module defines one click command named like the module; a failing import names the broken command.
COMMANDS = (
    "calibrate",
    "info",
    "train",
    "finetune",
    "prune",
    "export",
    "predict",
    "check",
    "bench",
    "build",
    "eval",
    "pipeline",
    "demo",
)


class NenniGroup(click.Group):
    """Imports each command on first use (a fast `nenni --help`; torch loads only when needed) and turns every
    NenniError (and the usual OS errors on user paths) into one line and exit status 1."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        return importlib.import_module(f"{__name__}.{name.replace('-', '_')}").command

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except NenniError as exc:
            raise click.ClickException(str(exc)) from None
        except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
            raise click.ClickException(f"{exc.strerror}: {exc.filename}") from None


@click.group(cls=NenniGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="nenni")
def main() -> None:
    """nenni-deploy: make a trained image classifier cheaper and harder to attack, export it, measure it."""
