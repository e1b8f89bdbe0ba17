"""The `nenni` command tree: one module per command, shared option groups in `options`."""

from __future__ import annotations

import importlib

import click

from .. import __version__
from ..errors import NenniError

# Each module defines one click command named like the module; a failing import names the broken command.
COMMANDS = ("calibrate", "info", "train", "finetune")


class NenniGroup(click.Group):
    """Turns every NenniError (and the usual OS errors on user paths) into one line and exit status 1."""

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


def _register() -> None:
    for name in COMMANDS:
        module = importlib.import_module(f"{__name__}.{name.replace('-', '_')}")
        main.add_command(module.command, name)


_register()
