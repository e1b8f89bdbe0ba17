"""The README's commands run as written on a fresh checkout (the tour, your own model, adversarial training):
read out of README.md, so the README cannot drift from the product again."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("## Your own model", "## A five-minute tour of the CLI")


def readme_commands(text: str) -> list[str]:
    """Every command of the bash blocks in SECTIONS, continuation lines joined, comments dropped."""
    commands = []
    for title in SECTIONS:
        start = text.index(title)
        end = text.find("\n## ", start + len(title))
        for block in re.findall(r"```bash\n(.*?)```", text[start : end if end > 0 else None], flags=re.S):
            joined = block.replace("\\\n", " ")
            for line in joined.splitlines():
                line = re.sub(r"(^|\s)#.*$", "", line).strip()
                if line:
                    commands.append(line)
    return commands


def test_the_readme_lists_the_tour():
    commands = readme_commands((ROOT / "README.md").read_text())
    assert any(c.startswith("nenni calibrate --arch examples/own_model/model.py:build") for c in commands)
    assert any(c.startswith("nenni eval") for c in commands) and any(c.startswith("torchrun") for c in commands)


@pytest.mark.slow
def test_every_readme_command_runs_as_written(tmp_path):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    for command in readme_commands((ROOT / "README.md").read_text()):
        args = shlex.split(command)
        if args[0] == "nenni":
            args = [sys.executable, "-m", "nenni_deploy.cli", *args[1:]]
        elif args[0] == "python":
            args = [sys.executable, *args[1:]]
        result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
        assert result.returncode == 0, f"$ {command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
