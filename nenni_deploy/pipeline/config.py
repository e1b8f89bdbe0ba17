"""Pipeline configs: TOML files whose tables are the options of each stage's command, as written on its command
line (`proj-dim = "n/4"` is `--proj-dim n/4`); the pipeline supplies the paths that connect the stages."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import NenniError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# Stages whose table holds command-line options, in the order they run.
# [prune] adds static channel pruning of the same dense model beside NENNI (exported, benched and attacked too).
STAGE_TABLES = ("train", "calibrate", "finetune", "prune", "export", "check", "bench", "eval")
TOP_KEYS = {"out", "threads", "data", "model", *STAGE_TABLES}
# Options each stage's command receives from the pipeline: setting them in the table would break the chain.
_MODEL = {"arch", "arch-kwargs", "mean", "std"}
_DATA = {"data", "data-dir", "image-size"}
_OUTPUTS = {"out", "json", "threads"}
RESERVED = {
    "train": _MODEL | _DATA | _OUTPUTS | {"progress"},
    "calibrate": _MODEL | _DATA | _OUTPUTS | {"weights"},
    "finetune": _DATA | _OUTPUTS | {"progress"},
    "prune": _MODEL | _DATA | _OUTPUTS | {"weights", "progress"},
    "export": _DATA | _OUTPUTS | {"dense"},
    "check": _DATA | {"json", "threads"},
    "bench": {"baseline", "json", "plot", "threads", "progress"},
    "eval": _DATA | {"source", "weights", "dense", "json", "plot", "threads", "progress", "cache"},
}


DATA_KEYS = {"name", "dir", "image-size"}
MODEL_KEYS = {"arch", "weights", "arch-kwargs", "mean", "std"}


def _option_text(key: str, value: Any) -> str:
    """[model] arch-kwargs as a table or JSON text, mean/std and image-size as lists or text."""
    import json

    if key == "arch-kwargs":
        return value if isinstance(value, str) else json.dumps(value)
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def builtin_configs() -> dict[str, Path]:
    folder = resources.files(__package__) / "configs"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".toml")}


@dataclass(frozen=True)
class PipelineConfig:
    """A validated config. `tables[stage]` is None when the stage is not configured (and does not run)."""

    source: str
    out: Path
    threads: int | None
    data: str
    data_dir: Path | None
    arch: str
    weights: Path | None
    model_options: dict[str, str] = field(default_factory=dict)  # arch-kwargs, mean, std
    image_size: str | None = None
    tables: dict[str, dict[str, Any] | None] = field(default_factory=dict)

    def options(self, stage: str) -> list[str]:
        """The stage's table as command-line options."""
        return table_to_args(self.tables.get(stage) or {})

    def enabled(self, stage: str) -> bool:
        return self.tables.get(stage) is not None


def _expand(value: Any) -> Any:
    """Environment variables in strings ($NENNI_SHARED/...), so one config serves machines with different paths."""
    if isinstance(value, str):
        return os.path.expandvars(value)
    if isinstance(value, list):
        return [_expand(v) for v in value]
    return value


def table_to_args(table: dict[str, Any]) -> list[str]:
    """`{"proj-dim": "n/4", "batch": [1, 64], "profile": true, "augment": false}` ->
    `--proj-dim n/4 --batch 1 --batch 64 --profile --no-augment` (lists repeat the option)."""
    args: list[str] = []
    for key, value in table.items():
        opt = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(opt if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            for v in value:
                args += [opt, str(v)]
        elif isinstance(value, dict):
            raise NenniError(f"option {key}: a nested table is not a command-line option")
        else:
            args += [opt, str(value)]
    return args


def check_paths(cfg: PipelineConfig) -> None:
    """The config's data and weights exist: found now, not after the first stage has run for an hour."""
    if cfg.weights is not None and not cfg.weights.is_file():
        raise NenniError(f"{cfg.source}: [model] weights {cfg.weights} is not a file")
    if cfg.data_dir is not None and not cfg.data_dir.is_dir():
        raise NenniError(f"{cfg.source}: [data] dir {cfg.data_dir} is not a folder")
    if cfg.data not in ("digits", "cifar10") and not Path(cfg.data).expanduser().is_dir():
        raise NenniError(f"{cfg.source}: [data] name {cfg.data!r} is neither digits, cifar10 nor a folder")
    module, sep, _ = cfg.arch.rpartition(":")
    if sep and module.endswith(".py") and not Path(module).is_file():
        raise NenniError(f"{cfg.source}: [model] arch names {module}, which is not a file")


def load_config(spec: str | os.PathLike) -> PipelineConfig:
    """Read a config file, or a built-in one by name (`demo`, ...)."""
    path, label = Path(spec), str(spec)
    if not path.exists():
        builtin = builtin_configs()
        if str(spec) in builtin:
            path, label = builtin[str(spec)], f"{spec} (built in: nenni_deploy/pipeline/configs/{spec}.toml)"
        else:
            names = ", ".join(sorted(builtin))
            raise NenniError(f"no config file {spec} (built-in configs: {names})")
    if path.is_dir():
        raise NenniError(f"{path} is a directory: give a .toml config file")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise NenniError(f"{path} is not a valid TOML config: {exc}") from None
    return parse_config(raw, label)


def parse_config(raw: dict[str, Any], source: str = "<config>") -> PipelineConfig:
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise NenniError(f"{source}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(TOP_KEYS))})")
    data = raw.get("data", {})
    model = raw.get("model", {})
    if not isinstance(data, dict) or not isinstance(model, dict):
        raise NenniError(f"{source}: [data] and [model] must be tables")
    extra = sorted(set(data) - DATA_KEYS) + sorted(set(model) - MODEL_KEYS)
    if extra:
        raise NenniError(
            f"{source}: unknown key(s) {', '.join(extra)} in [data] ({', '.join(sorted(DATA_KEYS))}) or [model] "
            f"({', '.join(sorted(MODEL_KEYS))})"
        )
    if "arch" not in model:
        raise NenniError(f"{source}: [model] needs arch (see `nenni info --models`, or file.py:FUNCTION)")
    threads = raw.get("threads")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise NenniError(f"{source}: threads must be a positive integer, not {threads!r}")
    tables: dict[str, dict[str, Any] | None] = {}
    for stage in STAGE_TABLES:
        table = raw.get(stage)
        if table is not None and not isinstance(table, dict):
            raise NenniError(f"{source}: [{stage}] must be a table")
        if table is not None:
            table = {k.replace("_", "-"): _expand(v) for k, v in table.items()}
            clash = sorted(set(table) & RESERVED[stage])
            if clash:
                raise NenniError(f"{source}: [{stage}] {', '.join(clash)}: set by the pipeline, not the config")
            table_to_args(table)  # nested tables fail here, with the option's name
        tables[stage] = table
    weights = model.get("weights")
    if weights is None and tables["train"] is None:
        raise NenniError(f"{source}: give [model] weights (import a checkpoint) or a [train] table (train one)")
    if tables["calibrate"] is None:
        raise NenniError(f"{source}: a [calibrate] table is needed (the NENNI settings)")
    data_dir = data.get("dir")
    return PipelineConfig(
        source=source,
        out=Path(_expand(raw.get("out", "runs/pipeline"))),
        threads=threads,
        data=str(data.get("name", "digits")),
        data_dir=Path(_expand(data_dir)) if data_dir else None,
        arch=_expand(str(model["arch"])),
        weights=Path(_expand(weights)) if weights else None,
        model_options={k: _option_text(k, model[k]) for k in ("arch-kwargs", "mean", "std") if k in model},
        image_size=_option_text("image-size", data["image-size"]) if "image-size" in data else None,
        tables=tables,
    )
