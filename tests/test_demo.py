"""The README's first command: the whole pipeline on the embedded digits data set, end to end."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from nenni_deploy.cli import main


def test_demo_writes_a_report_with_measured_numbers(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(
        main, ["demo", "--out", str(out), "--epochs", "4", "--finetune-epochs", "2", "--threads", "1"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dense_accuracy"] > 80
    assert 0 <= summary["nenni_finetuned_accuracy"] <= 100
    assert summary["macs_nenni"] < summary["macs_dense"]
    assert summary["onnx"]["dense_accuracy"] == pytest.approx(summary["dense_accuracy"], abs=0.5)
    assert summary["onnx"]["check"]["passed"] and summary["onnx"]["check"]["agreement"] >= 99.0
    report = (out / "report.md").read_text()
    assert "NENNI, fine-tuned" in report and f"{summary['dense_accuracy']:.2f}" in report
    assert "report:" in result.output
    for name in ("train.json", "calibrate.json", "finetune.json", "nenni.onnx", "dense.onnx"):
        assert (out / name).exists()
