"""docs/cli.md is generated from the commands' click help; this fails when someone changes a command and not it."""

from __future__ import annotations

from pathlib import Path

from nenni_deploy.cli.reference import render


def test_cli_reference_is_current():
    page = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
    assert page.read_text() == render(), "docs/cli.md is stale: python -m nenni_deploy.cli.reference docs/cli.md"
