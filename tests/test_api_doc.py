"""docs/api.md runs as written: its model file and its example, in a fresh folder."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.slow
def test_the_api_page_runs_as_written(tmp_path):
    model_file, example = python_blocks(DOC.read_text())
    assert model_file.startswith("# model.py")
    (tmp_path / "model.py").write_text(model_file)
    (tmp_path / "example.py").write_text(example)
    result = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "ONNX Runtime agrees with PyTorch" in result.stdout
    assert (tmp_path / "runs/api/tuned/config.json").is_file() and (tmp_path / "runs/api/dense.onnx").is_file()
