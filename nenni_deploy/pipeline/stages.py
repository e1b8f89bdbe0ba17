"""The pipeline's stages: each is one or more real `nenni` commands, built from the config and the paths the
stages before it wrote. A stage is skipped when it already ran with the same arguments and its outputs exist;
once one stage runs, every later one runs too (its inputs changed)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..files import atomic_output
from .config import PipelineConfig

Invoke = Callable[[list[str]], None]


@dataclass(frozen=True)
class Layout:
    """Where every stage writes, under the pipeline's output folder."""

    out: Path

    def __getattr__(self, name: str) -> Path:  # only for the names in FILES
        try:
            return self.out / FILES[name]
        except KeyError:
            raise AttributeError(name) from None


FILES = {
    "dense_dir": "dense",
    "calibrated_dir": "nenni-calibrated",
    "finetuned_dir": "nenni",
    "pruned_dir": "pruned",
    "pruned_onnx": "pruned.onnx",
    "prune_json": "prune.json",
    "export_pruned_json": "export-pruned.json",
    "eval_pruned_json": "eval-pruned.json",
    "eval_pruned_png": "eval-pruned.png",
    "nenni_onnx": "nenni.onnx",
    "dense_onnx": "dense.onnx",
    "train_json": "train.json",
    "calibrate_json": "calibrate.json",
    "finetune_json": "finetune.json",
    "export_nenni_json": "export-nenni.json",
    "export_dense_json": "export-dense.json",
    "check_json": "check.json",
    "bench_json": "bench.json",
    "bench_png": "bench.png",
    "eval_nenni_json": "eval-nenni.json",
    "eval_nenni_png": "eval-nenni.png",
    "eval_dense_json": "eval-dense.json",
    "eval_dense_png": "eval-dense.png",
    "state": "pipeline-state.json",
}


def _data(cfg: PipelineConfig) -> list[str]:
    return [
        "--data", cfg.data,
        *(["--data-dir", str(cfg.data_dir)] if cfg.data_dir else []),
        *(["--image-size", cfg.image_size] if cfg.image_size else []),
    ]  # fmt: skip


def _model_options(cfg: PipelineConfig) -> list[str]:
    return [a for key, value in cfg.model_options.items() for a in (f"--{key}", value)]


def _threads(cfg: PipelineConfig) -> list[str]:
    return ["--threads", str(cfg.threads)] if cfg.threads else []


def dense_model(cfg: PipelineConfig, lay: Layout) -> list[str]:
    """The trained model directory when there is a [train] table, else the architecture and imported checkpoint."""
    if cfg.enabled("train"):
        return ["--arch", str(lay.dense_dir)]
    return ["--arch", cfg.arch, "--weights", str(cfg.weights), *_model_options(cfg)]


def nenni_dir(cfg: PipelineConfig, lay: Layout) -> Path:
    return lay.finetuned_dir if cfg.enabled("finetune") else lay.calibrated_dir


def _train(cfg: PipelineConfig, lay: Layout) -> list[list[str]]:
    init = ["--weights", str(cfg.weights)] if cfg.weights else []  # training starts from an imported checkpoint
    return [
        ["train", "--arch", cfg.arch, *init, *_model_options(cfg), *_data(cfg), "--out", str(lay.dense_dir),
         "--json", str(lay.train_json), "--no-progress", *_threads(cfg), *cfg.options("train")]
    ]  # fmt: skip


def _calibrate(cfg: PipelineConfig, lay: Layout) -> list[list[str]]:
    return [
        ["calibrate", *dense_model(cfg, lay), *_data(cfg),
         "--out", str(lay.calibrated_dir), "--json", str(lay.calibrate_json), *_threads(cfg), *cfg.options("calibrate")]
    ]  # fmt: skip


def _finetune(cfg: PipelineConfig, lay: Layout) -> list[list[str]]:
    return [
        ["finetune", str(lay.calibrated_dir), *_data(cfg), "--out", str(lay.finetuned_dir),
         "--json", str(lay.finetune_json), "--no-progress", *_threads(cfg), *cfg.options("finetune")]
    ]  # fmt: skip


def _prune(cfg: PipelineConfig, lay: Layout) -> list[list[str]]:
    return [
        ["prune", *dense_model(cfg, lay), *_data(cfg), "--out", str(lay.pruned_dir), "--json", str(lay.prune_json),
         "--no-progress", *_threads(cfg), *cfg.options("prune")]
    ]  # fmt: skip


def _export(cfg: PipelineConfig, lay: Layout) -> list[list[str]]:
    table = cfg.tables.get("export") or {}
    # The dense baseline is the model NENNI was made from (kept in its directory, whatever fine-tuning did to the
    # base weights). It shares the NENNI export's target and opset only.
    shared = [a for k in ("target", "opset") if k in table for a in (f"--{k}", str(table[k]))]
    data = _data(cfg)
    return [
        ["export", str(nenni_dir(cfg, lay)), "--out", str(lay.nenni_onnx), "--json", str(lay.export_nenni_json),
         *data, *_threads(cfg), *cfg.options("export")],
        ["export", str(nenni_dir(cfg, lay)), "--dense", "--out", str(lay.dense_onnx),
         "--json", str(lay.export_dense_json), *data, *_threads(cfg), *shared],
    ] + ([
        ["export", str(lay.pruned_dir), "--out", str(lay.pruned_onnx), "--json", str(lay.export_pruned_json),
         *data, *_threads(cfg), *shared],
    ] if cfg.enabled("prune") else [])  # fmt: skip


def _check(cfg: PipelineConfig, lay: Layout) -> list[list[str]]:
    return [
        ["check", str(nenni_dir(cfg, lay)), str(lay.nenni_onnx), *_data(cfg), "--json", str(lay.check_json),
         *_threads(cfg), *cfg.options("check")]
    ]  # fmt: skip


def _bench(cfg: PipelineConfig, lay: Layout) -> list[list[str]]:
    pruned = [str(lay.pruned_onnx)] if cfg.enabled("prune") else []
    return [
        ["bench", str(lay.nenni_onnx), *pruned, "--baseline", str(lay.dense_onnx), "--json", str(lay.bench_json),
         "--plot", str(lay.bench_png), "--no-progress", *_threads(cfg), *cfg.options("bench")]
    ]  # fmt: skip


def _eval(cfg: PipelineConfig, lay: Layout) -> list[list[str]]:
    """The exported models under the same attacks and budgets: the NENNI one (white-box on its PyTorch source,
    BPDA, EOT when noisy, transfer from its dense base), the dense one and the pruned one, replayed on ONNX
    Runtime."""
    common = [*_data(cfg), "--no-progress", *_threads(cfg), *cfg.options("eval")]
    return [
        ["eval", str(lay.nenni_onnx), "--source", str(nenni_dir(cfg, lay)), "--json", str(lay.eval_nenni_json),
         "--plot", str(lay.eval_nenni_png), *common],
        ["eval", str(lay.dense_onnx), "--source", str(nenni_dir(cfg, lay)), "--json", str(lay.eval_dense_json),
         "--plot", str(lay.eval_dense_png), *common],
    ] + ([
        ["eval", str(lay.pruned_onnx), "--source", str(lay.pruned_dir), "--json", str(lay.eval_pruned_json),
         "--plot", str(lay.eval_pruned_png), *common],
    ] if cfg.enabled("prune") else [])  # fmt: skip


@dataclass(frozen=True)
class Stage:
    name: str
    commands: Callable[[PipelineConfig, Layout], list[list[str]]]
    outputs: Callable[[Layout], list[Path]]
    # The config table that switches the stage on; None: it always runs.
    table: str | None = None

    def enabled(self, cfg: PipelineConfig) -> bool:
        return self.table is None or cfg.enabled(self.table)


STAGES = (
    Stage("train", _train, lambda lay: [lay.train_json, lay.dense_dir / "config.json"], table="train"),
    Stage("calibrate", _calibrate, lambda lay: [lay.calibrate_json, lay.calibrated_dir / "config.json"]),
    Stage("finetune", _finetune, lambda lay: [lay.finetune_json, lay.finetuned_dir / "config.json"], table="finetune"),
    Stage("prune", _prune, lambda lay: [lay.prune_json, lay.pruned_dir / "config.json"], table="prune"),
    Stage("export", _export, lambda lay: [lay.nenni_onnx, lay.dense_onnx, lay.export_nenni_json]),
    Stage("check", _check, lambda lay: [lay.check_json]),
    Stage("bench", _bench, lambda lay: [lay.bench_json, lay.bench_png], table="bench"),
    Stage("eval", _eval, lambda lay: [lay.eval_nenni_json, lay.eval_dense_json], table="eval"),
)


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


@dataclass(frozen=True)
class Planned:
    stage: Stage
    commands: list[list[str]]
    skip: bool  # done earlier with the same arguments, outputs present, and nothing before it reruns
    previous: dict[str, Any]


def plan_stages(cfg: PipelineConfig, force: bool = False) -> list[Planned]:
    """The enabled stages in order, each with whether a run now would skip it."""
    lay = Layout(cfg.out)
    state = {} if force else _read_state(lay.state)
    planned, rerun = [], force
    for stage in STAGES:
        if not stage.enabled(cfg):
            continue
        commands = stage.commands(cfg, lay)
        previous = state.get(stage.name, {})
        skip = not rerun and previous.get("commands") == commands and all(p.exists() for p in stage.outputs(lay))
        rerun = rerun or not skip
        planned.append(Planned(stage, commands, skip, previous))
    return planned


def run_pipeline(
    cfg: PipelineConfig, invoke: Invoke, force: bool = False, echo: Callable[[str], None] = print
) -> dict[str, dict[str, Any]]:
    """Run every enabled stage in order; returns {stage: {"status": ran|skipped, "seconds", "commands"}}."""
    lay = Layout(cfg.out)
    cfg.out.mkdir(parents=True, exist_ok=True)
    state = {} if force else _read_state(lay.state)
    done: dict[str, dict[str, Any]] = {}
    for item in plan_stages(cfg, force):
        stage, commands = item.stage, item.commands
        if item.skip:
            echo(f"[{stage.name}] done earlier with the same arguments: skipped (--force reruns it)")
            done[stage.name] = {**item.previous, "status": "skipped"}
            continue
        start = time.perf_counter()
        for args in commands:
            invoke(args)
        done[stage.name] = {"status": "ran", "seconds": time.perf_counter() - start, "commands": commands}
        state[stage.name] = done[stage.name]
        with atomic_output(lay.state) as tmp:
            tmp.write_text(json.dumps(state, indent=2) + "\n")
    return done
