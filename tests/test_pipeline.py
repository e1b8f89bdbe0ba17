"""`nenni pipeline` and `nenni demo`: config parsing, the stage chain, resume, and the report's numbers coming
from the stages' own outputs."""

from __future__ import annotations

import json

import pytest
from _cli import assert_one_line_error, invoke

from nenni_deploy.errors import NenniError
from nenni_deploy.pipeline import STAGES, load_config
from nenni_deploy.pipeline.config import builtin_configs, parse_config, table_to_args

# The demo's stages at a size a test can afford: every stage runs, every attack family that applies.
SMALL = """
out = "{out}"
threads = 1
[data]
name = "digits"
[model]
arch = "small_cnn"
[train]
epochs = 8
lr = 0.05
batch-size = 64
[calibrate]
granularity = "channel"
ratio = 0.5
proj-dim = "n/4"
calib-n = 256
eval-n = 200
[finetune]
epochs = 2
lr = 0.01
eval-n = 200
[prune]
budget-macs = 0.7
epochs = 2
eval-n = 200
[export]
[check]
n = 100
[bench]
batch = [1, 8]
iterations = 20
rounds = 2
warmup = 0
[eval]
n = 40
eps = "0.1"
steps = 5
aa-version = "custom"
aa-attacks = "apgd-ce"
aa-iters = 5
transfer-steps = 3
transfer-methods = "pgd"
cs-layers = "conv3"
"""


def test_table_to_args_follows_the_command_line():
    args = table_to_args({"proj-dim": "n/4", "batch": [1, 64], "profile": True, "augment": False, "ratio": 0.5})
    assert args == ["--proj-dim", "n/4", "--batch", "1", "--batch", "64", "--profile", "--no-augment", "--ratio", "0.5"]


def test_builtin_configs_parse_and_name_existing_stages():
    names = builtin_configs()
    assert {"demo", "cifar10-resnet20", "cifar10-resnet4b"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert cfg.enabled("calibrate")
    demo = load_config("demo")
    assert demo.data == "digits" and all(demo.enabled(s.table) for s in STAGES if s.table)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"model": {"arch": "small_cnn"}, "calibrate": {}, "trian": {}}, "unknown key"),
        ({"model": {}, "calibrate": {}, "train": {}}, "needs arch"),
        ({"model": {"arch": "small_cnn"}, "calibrate": {}}, "give [model] weights"),
        ({"model": {"arch": "small_cnn"}, "train": {}}, "[calibrate] table"),
        ({"model": {"arch": "small_cnn"}, "train": {}, "calibrate": {"out": "x"}}, "set by the pipeline"),
        ({"model": {"arch": "small_cnn"}, "train": {}, "calibrate": {}, "threads": 0}, "threads"),
        ({"model": {"arch": "small_cnn"}, "train": {}, "calibrate": {"a": {"b": 1}}}, "nested table"),
    ],
)
def test_bad_configs_are_refused_with_the_reason(raw, message):
    with pytest.raises(NenniError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(raw)


def test_environment_variables_expand_in_paths(monkeypatch):
    monkeypatch.setenv("NENNI_SHARED", "/data/shared")
    cfg = load_config("cifar10-resnet20")
    assert str(cfg.data_dir) == "/data/shared/data/cifar10"
    assert str(cfg.weights).startswith("/data/shared/weights/")


def test_bad_input_gets_one_line(tmp_path):
    assert_one_line_error(invoke("pipeline", tmp_path / "missing.toml"))
    broken = tmp_path / "broken.toml"
    broken.write_text("out = [unclosed\n")
    assert_one_line_error(invoke("pipeline", broken))
    assert_one_line_error(invoke("pipeline", tmp_path))
    foreign = tmp_path / "foreign.toml"
    foreign.write_text('[model]\narch = "small_cnn"\n[train]\nepochs = 1\n[calibrate]\nratoi = 0.5\n')
    result = invoke("pipeline", foreign, "--out", tmp_path / "run")
    assert_one_line_error(result)
    assert "calibrate" in result.output


def test_demo_dry_run_prints_the_real_commands(tmp_path):
    result = invoke("demo", "--dry-run", "--out", tmp_path / "d")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line.split()[1] for line in lines if line.startswith("  nenni ")] == [
        "train", "calibrate", "finetune", "prune", "export", "export", "export", "check", "bench",
        "eval", "eval", "eval",
    ]  # fmt: skip
    assert [line for line in lines if line.startswith("[")][0] == "[train] would run"
    assert not (tmp_path / "d").exists()


def test_pipeline_runs_every_stage_and_reports_their_numbers(tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "small.toml"
    config.write_text(SMALL.format(out=out))
    result = invoke("pipeline", config)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    report = (out / "report.md").read_text()
    assert "report:" in result.output and str(out / "report.md") in result.output

    cal = json.loads((out / "calibrate.json").read_text())
    assert summary["accuracy"]["dense"] == cal["dense_accuracy"] > 80
    assert summary["cost"]["macs_nenni"] < summary["cost"]["macs_dense"]
    assert summary["accuracy"]["onnx"]["passed"] and summary["accuracy"]["onnx"]["top1_agreement"] >= 99

    bench = json.loads((out / "bench.json").read_text())
    assert [r["batch"] for r in summary["speed"]["batches"]] == [1, 8]
    assert summary["speed"]["batches"][0]["speedup"] == bench["batches"][0]["speedup"]["speedup"]
    assert (out / "bench.png").stat().st_size > 0

    nenni_eval = json.loads((out / "eval-nenni.json").read_text())
    dense_eval = json.loads((out / "eval-dense.json").read_text())
    row = summary["robustness"]["per_eps"][0]
    assert row["nenni_worst"] == nenni_eval["worst_case"]["0.1"]
    assert row["dense_worst"] == dense_eval["worst_case"]["0.1"]
    # white-box, adaptive and transfer attacks on the NENNI export, white-box on the dense one
    assert {"pgd-ce", "bpda-exact", "transfer-pgd:base"} <= set(nenni_eval["attacks"])
    assert "pgd-ce" in dense_eval["attacks"]
    assert f"{row['nenni_worst']:.2f}" in report and "## Robustness" in report and "## Speed" in report

    # [prune]: static pruning of the same dense model, exported, benched and attacked beside NENNI
    pruned = json.loads((out / "prune.json").read_text())
    assert summary["accuracy"]["pruned"] == pruned["pruned_accuracy_after"]
    assert summary["cost"]["macs_pruned"] <= 0.7 * summary["cost"]["macs_dense"]
    assert summary["speed"]["batches"][0]["pruned_speedup"] == bench["batches"][0]["speedups"]["pruned"]["speedup"]
    pruned_eval = json.loads((out / "eval-pruned.json").read_text())
    assert row["pruned_worst"] == pruned_eval["worst_case"]["0.1"]
    assert "static pruning (torch-pruning)" in report and "pruned speedup" in report

    # A second run resumes: every stage is skipped and the report is rewritten from the same outputs.
    again = invoke("pipeline", config)
    assert again.exit_code == 0, again.output
    assert again.output.count("skipped (--force reruns it)") == len(STAGES)
    assert "up to date" in again.output and "total time" not in again.output
    dry = invoke("pipeline", config, "--dry-run")
    assert dry.output.count("a run now skips it") == len(STAGES), dry.output
    assert json.loads((out / "summary.json").read_text())["robustness"] == summary["robustness"]

    # Changing one stage's options reruns that stage and every later one, not the earlier ones.
    config.write_text(SMALL.format(out=out).replace('eps = "0.1"', 'eps = "0.05"'))
    third = invoke("pipeline", config)
    assert third.exit_code == 0, third.output
    state = json.loads((out / "summary.json").read_text())["stages"]
    assert state["eval"]["status"] == "ran" and state["bench"]["status"] == "skipped"
    assert json.loads((out / "eval-nenni.json").read_text())["eps"] == ["0.05"]


def test_pipeline_imports_a_checkpoint_without_training(tmp_path):
    """[model] weights and no [train] table: calibrate the given checkpoint; stages without a table do not run."""
    trained = tmp_path / "dense"
    assert invoke("train", "--arch", "small_cnn", "--data", "digits", "--epochs", "6", "--batch-size", "64",
                  "--out", trained, "--threads", "1", "--no-progress").exit_code == 0  # fmt: skip
    config = tmp_path / "import.toml"
    config.write_text(
        f'out = "{tmp_path / "run"}"\nthreads = 1\n[model]\narch = "small_cnn"\n'
        f'weights = "{trained / "weights.safetensors"}"\n[calibrate]\nratio = 0.75\ncalib-n = 256\neval-n = 100\n'
        "[export]\n[check]\nn = 50\n"
    )
    result = invoke("pipeline", config)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert list(summary["stages"]) == ["calibrate", "export", "check"]
    assert summary["weights"] == str(trained / "weights.safetensors")
    assert summary["speed"] is None and summary["robustness"] is None
    assert "## Speed" not in (tmp_path / "run" / "report.md").read_text()


@pytest.mark.shared
@pytest.mark.slow  # about 30 s idle: the built-in CIFAR-10 config end to end on the shared checkpoint
def test_builtin_cifar10_config_runs_on_the_shared_checkpoint(tmp_path, monkeypatch, shared_dir):
    """The built-in ResNet-4B config (imported checkpoint, noisy element NENNI) end to end on real CIFAR-10, with
    every stage shrunk to seconds: the config's paths, the noise checks and EOT/AutoAttack rand on a real model."""
    from dataclasses import replace

    from nenni_deploy.cli.pipeline import invoke_command
    from nenni_deploy.pipeline import run_pipeline, summarise

    monkeypatch.setenv("NENNI_SHARED", str(shared_dir))
    cfg = load_config("cifar10-resnet4b")
    tables = {
        **cfg.tables,
        "calibrate": {**cfg.tables["calibrate"], "calib-n": 256, "eval-n": 200},
        "check": {"n": 100},
        "bench": {"batch": [1, 4], "iterations": 10, "rounds": 2, "warmup": 0},
        "eval": {"n": 20, "eps": "8/255", "steps": 2, "eot-samples": 2, "aa-iters": 2, "transfer-steps": 2,
                 "transfer-methods": "pgd"},
    }  # fmt: skip
    cfg = replace(cfg, out=tmp_path / "r4b", threads=1, tables=tables)
    stages = run_pipeline(cfg, invoke_command)
    summary = summarise(cfg, stages, 0.0)
    assert list(stages) == ["calibrate", "export", "check", "bench", "eval"]
    assert summary["nenni_config"]["noise"] == "gaussian"
    assert summary["accuracy"]["dense"] > 60  # the adversarially trained checkpoint (77 % on 1,000 images)
    nenni_eval = json.loads((tmp_path / "r4b" / "eval-nenni.json").read_text())
    assert nenni_eval["target"]["randomised"]
    assert "autoattack-rand" in nenni_eval["attacks"] and any(n.startswith("eot") for n in nenni_eval["attacks"])


@pytest.mark.parametrize(
    "model, data, message",
    [
        ('arch = "small_cnn"\nweights = "{tmp}/missing.safetensors"', 'name = "digits"', "is not a file"),
        ('arch = "small_cnn"\nweights = "{tmp}/w.safetensors"', 'name = "{tmp}/no-such-folder"', "neither digits"),
        ('arch = "{tmp}/gone.py:build"\nweights = "{tmp}/w.safetensors"', 'name = "digits"', "gone.py"),
    ],
)
def test_config_paths_are_checked_before_the_first_stage(tmp_path, model, data, message):
    (tmp_path / "w.safetensors").write_bytes(b"")
    config = tmp_path / "c.toml"
    body = f'out = "{tmp_path}/run"\n[model]\n{model}\n[data]\n{data}\n[calibrate]\nratio = 0.5\n'
    config.write_text(body.replace("{tmp}", str(tmp_path)))
    result = invoke("pipeline", config)
    assert_one_line_error(result)
    assert message in result.output and not (tmp_path / "run").exists()
