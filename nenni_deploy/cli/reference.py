"""The CLI reference (docs/cli.md), generated from the commands' own click help so it cannot drift:
`python -m nenni_deploy.cli.reference docs/cli.md` rewrites it; a test fails when it is stale."""

from __future__ import annotations

import sys
from pathlib import Path

import click

WIDTH = 110  # fixed, so the page does not depend on the terminal that generated it


def _context(command: click.Command, name: str, parent: click.Context | None) -> click.Context:
    settings = {**command.context_settings, "terminal_width": WIDTH, "max_content_width": WIDTH}
    return click.Context(command, info_name=name, parent=parent, **settings)


def _help(command: click.Command, name: str, parent: click.Context | None) -> str:
    return command.get_help(_context(command, name, parent))


def render() -> str:
    from . import main

    root = _context(main, "nenni", None)
    names = main.list_commands(root)
    lines = [
        "# CLI reference",
        "",
        "Generated from the click help of every command by `python -m nenni_deploy.cli.reference docs/cli.md`;",
        "`nenni COMMAND --help` prints the same text.",
        "",
        "Commands: " + ", ".join(f"[{n}](#nenni-{n})" for n in names) + ".",
        "",
        "## nenni",
        "",
        "```text",
        _help(main, "nenni", None),
        "```",
    ]
    for name in names:
        lines += ["", f"## nenni {name}", "", "```text", _help(main.get_command(root, name), name, root), "```"]
    return "\n".join(lines) + "\n"


def main_(argv: list[str]) -> int:
    text = render()
    if argv:
        from ..files import atomic_output

        with atomic_output(argv[0]) as tmp:
            Path(tmp).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main_(sys.argv[1:]))
