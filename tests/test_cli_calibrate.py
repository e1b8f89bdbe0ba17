"""`nenni calibrate` and `nenni info` on the embedded digits data: outputs and the bad-input catalogue."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from nenni_deploy.cli import main
from nenni_deploy.models import create_model, save_state_dict
from nenni_deploy.nenni.io import load_model_dir


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "small_cnn.safetensors"
    save_state_dict(create_model("small_cnn"), path)
    return path


def calibrate(*args):
    return CliRunner().invoke(main, ["calibrate", "--calib-n", "128", "--eval-n", "64", "--threads", "1", *args])


def test_calibrate_writes_model_json_and_honours_layer_ratios(tmp_path, weights):
    out, js = tmp_path / "m", tmp_path / "m.json"
    result = calibrate(
        "--arch",
        "small_cnn",
        "--weights",
        str(weights),
        "--ratio",
        "0.5",
        "--layer-ratio",
        "conv3=0.25",
        "--proj-dim",
        "n/4",
        "--out",
        str(out),
        "--json",
        str(js),
    )
    assert result.exit_code == 0, result.output
    assert "MACs/image" in result.output and "conv2" in result.output
    summary = json.loads(js.read_text())
    assert {s["name"]: s["ratio"] for s in summary["layers"]} == {"conv2": 0.5, "conv3": 0.25}
    model, card = load_model_dir(out)
    assert card["layers"][1]["ratio"] == 0.25 and card["metrics"]["eval_images"] == 64
    info = CliRunner().invoke(main, ["info", str(out)])
    assert info.exit_code == 0 and "conv3" in info.output
    assert CliRunner().invoke(main, ["info", "--models"]).output.count("resnet") >= 5


@pytest.mark.parametrize(
    "args, message",
    [
        (["--arch", "nonet"], "unknown"),
        (["--arch", "resnet20", "--data", "digits"], "does not fit"),
        (["--ratio", "1.5"], "ratio"),
        (["--ratio", "0"], "ratio"),
        (["--layer-ratio", "conv3"], "PATTERN=RATIO"),
        (["--layer-ratio", "conv3=abc"], "PATTERN=RATIO"),
        (["--granularity", "nm", "--nm", "3:7"], "multiple of M"),
        (["--proj-dim", "lots"], "--proj-dim"),
        (["--include", "nothing*"], "no layer matches"),
    ],
)
def test_bad_settings_fail_with_one_line(tmp_path, weights, args, message):
    base = {"--arch": "small_cnn", "--weights": str(weights), "--out": str(tmp_path / "m")}
    for flag in args[::2]:
        base.pop(flag, None)
    flat = [v for kv in base.items() for v in kv] + list(args)
    result = calibrate(*flat)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()


def test_missing_and_foreign_weights(tmp_path):
    result = calibrate("--arch", "small_cnn", "--weights", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "m"))
    assert result.exit_code != 0 and "Traceback" not in result.output
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    result = calibrate("--arch", "small_cnn", "--weights", str(junk), "--out", str(tmp_path / "m"))
    assert result.exit_code != 0 and len(result.output.strip().splitlines()) == 1


def test_info_on_a_corrupt_model_dir(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    result = CliRunner().invoke(main, ["info", str(tmp_path)])
    assert result.exit_code != 0 and "not valid JSON" in result.output
