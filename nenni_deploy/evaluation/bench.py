"""`nenni bench`: latency and throughput of a model beside its dense baseline, measured in the same run.

Models are interleaved round by round (A B A B ...) so that drift of the machine (other processes, frequency,
thermals) hits both; warm-up is excluded; the speedup is the geometric mean of the per-round ratios of mean
latencies with a t-interval on their logarithms. The report (a JSON-ready dict, schema in docs/bench.md) also
holds the ideal speedups the model's metadata promises, the environment, the load that other processes put on
the machine during the run, and optionally an operator profile split into the NENNI stages.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import NenniError
from ..files import sha256_file
from ..runtime.layout import cpu_conv_layout
from ..runtime.loading import LoadedModel, load_onnx_checked
from ..runtime.runners import PROVIDERS, open_runner
from . import profile as op_profile

SCHEMA_VERSION = 2  # 2: several models against one baseline; precision and costs as run
PERCENTILES = (50, 90, 95, 99)


@dataclass
class BenchSettings:
    batches: tuple[int, ...] = (1, 64)
    provider: str = "cpu"
    threads: int | None = None  # intra-op threads; None = every core this process may use
    warmup: float = 1.0  # seconds per model and batch size, excluded from the statistics
    duration: float | None = 5.0  # timed seconds per model and batch size ...
    iterations: int | None = None  # ... or a fixed number of timed runs instead
    rounds: int = 10  # interleaving rounds; the speedup's interval is across them
    profile: bool = False
    profile_iterations: int = 20
    seed: int = 0

    def validate(self) -> None:
        if not self.batches or any(b < 1 for b in self.batches):
            raise NenniError("--batch must be >= 1")
        if self.provider not in PROVIDERS:
            raise NenniError(f"--provider must be one of {', '.join(PROVIDERS)}, got {self.provider!r}")
        if self.threads is not None and self.threads < 1:
            raise NenniError("--threads must be >= 1")
        if not (self.warmup >= 0 and math.isfinite(self.warmup)):
            raise NenniError("--warmup must be a finite number of seconds >= 0")
        if self.iterations is None and not (self.duration and self.duration > 0 and math.isfinite(self.duration)):
            raise NenniError("--duration must be a finite number of seconds > 0")
        if self.iterations is not None and self.iterations < 1:
            raise NenniError("--iterations must be >= 1")
        if self.rounds < 2:
            raise NenniError("--rounds must be >= 2 (the speedup's interval needs at least two rounds)")
        if self.iterations is not None and self.iterations < self.rounds:
            raise NenniError(f"--iterations ({self.iterations}) must be at least --rounds ({self.rounds})")

    @property
    def intra_threads(self) -> int:
        return self.threads or len(os.sched_getaffinity(0))


@dataclass
class Subject:
    """One model under test: its label in the report, its file, and what its metadata says it costs."""

    label: str
    path: Path
    loaded: LoadedModel | None  # None for a TensorRT engine
    sha256: str
    cost: dict[str, float] = field(default_factory=dict)
    plan: Any = None  # an active TensorRTRunner for a .plan

    @property
    def is_plan(self) -> bool:
        return self.plan is not None

    @classmethod
    def load(cls, label: str, path: str | os.PathLike) -> Subject:
        path = Path(path)
        if path.suffix == ".plan":
            return cls._load_plan(label, path)
        loaded = load_onnx_checked(path)
        if len(loaded.inputs) != 1:
            raise NenniError(
                f"{path}: nenni bench needs a model with one image input, this one has {len(loaded.inputs)}"
            )
        return cls(label, path, loaded, sha256_file(path), _cost(loaded.metadata))

    @classmethod
    def _load_plan(cls, label: str, path: Path) -> Subject:
        """A TensorRT engine built by `nenni build`: timed with CUDA events by TensorRTRunner (GPU machines)."""
        runner = open_runner(path)
        runner.activate()
        if len(runner.input_specs()) != 1:
            raise NenniError(f"{path}: nenni bench needs an engine with one image input")
        return cls(label, path, None, sha256_file(path), _cost(runner.metadata), plan=runner)

    @property
    def metadata(self) -> dict[str, str]:
        return self.plan.metadata if self.is_plan else self.loaded.metadata

    @property
    def precision(self) -> str:
        return self.metadata.get("nenni.precision", "float32")

    @property
    def dense(self) -> bool:
        if self.metadata.get("nenni.dense") == "true":
            return True
        if self.loaded is not None:
            return not self.loaded.is_nenni
        try:
            return not json.loads(self.metadata.get("nenni.layers", "[]"))
        except json.JSONDecodeError:
            return True

    def as_run(self) -> dict[str, Any]:
        """MACs and BitOPs per image of what this file computes, at the precision it computes in."""
        return cost_as_run(self.cost, dense=self.dense, precision=self.precision)

    def _dims(self) -> list:
        spec = self.plan.input_specs()[0] if self.is_plan else self.loaded.inputs[0]
        dims = list(spec.shape)
        if not dims:
            raise NenniError(f"{self.path}: its input has no declared shape")
        if not all(isinstance(d, int) and d > 0 for d in dims[1:]):
            raise NenniError(f"{self.path}: only the batch dimension may be dynamic, input shape is {dims}")
        return dims

    def image_shape(self) -> tuple[int, ...]:
        """One image's shape (the input without its batch dimension, fixed or not)."""
        return tuple(self._dims()[1:])

    def input_shape(self, batch: int) -> tuple[int, ...]:
        dims = self._dims()
        if isinstance(dims[0], int) and dims[0] > 0 and dims[0] != batch:
            raise NenniError(f"{self.path}: its batch size is fixed at {dims[0]}; cannot run --batch {batch}")
        return (batch, *dims[1:])

    def describe(self) -> dict[str, Any]:
        meta = self.metadata
        if self.loaded is not None:
            layers, config = self.loaded.nenni_nodes, self.loaded.config()
        else:  # an engine: what the ONNX model it was built from recorded
            try:
                layers = len(json.loads(meta.get("nenni.layers", "[]")))
                config = json.loads(meta.get("nenni.config", "{}"))
            except json.JSONDecodeError:
                layers, config = 0, {}
        return {
            "label": self.label,
            "path": str(self.path),
            "format": "tensorrt-plan" if self.is_plan else "onnx",
            "sha256": self.sha256,
            "bytes": self.path.stat().st_size,
            "arch": meta.get("nenni.arch", ""),
            "dense": not layers,
            "nenni_layers": layers,
            "noise": meta.get("nenni.noise", "none"),
            "precision": self.precision,
            "config": config,
            "cost": self.cost,
            "as_run": self.as_run(),
        }

    def close(self) -> None:
        if self.is_plan:
            self.plan.deactivate()


def _cost(metadata: dict[str, str]) -> dict[str, float]:
    """The `nenni.cost` metadata `nenni export` writes (empty for models from elsewhere)."""
    try:
        cost = json.loads(metadata.get("nenni.cost", "{}"))
    except json.JSONDecodeError:
        return {}
    return cost if isinstance(cost, dict) else {}


def cost_as_run(cost: dict[str, float], *, dense: bool, precision: str) -> dict[str, Any]:
    """Per-image MACs and BitOPs of what a file computes (from its `nenni.cost` metadata).

    MACs do not depend on the precision. BitOPs do: `nenni calibrate` counts them at W8A8 (the exact path and
    dense layers at 8 x 8 bits, the approximator at its bits x 8, the ternary projection as 8-bit additions),
    which is what an int8 export runs; a float32 export runs every multiply-accumulate at 32 x 32 bits and the
    projection's additions at 32 bits.
    """
    if not cost:
        return {"macs": None, "bitops": None, "bits": None}
    int8 = precision == "int8"
    if dense:
        macs = cost.get("macs_dense")
        bitops = cost.get("bitops_dense") if int8 else (macs * 32 * 32 if macs else None)
    else:
        macs = cost.get("macs_nenni")
        if int8:
            bitops = cost.get("bitops_nenni")
        elif "macs_exact" in cost and "macs_approx" in cost:
            bitops = 32 * 32 * (cost["macs_exact"] + cost["macs_approx"]) + 32 * cost.get("adds_projection", 0.0)
        else:
            bitops = None
    return {"macs": macs, "bitops": bitops, "bits": "W8A8, approximator at its bits" if int8 else "fp32"}


# -- statistics -------------------------------------------------------------------------------------------------
def latency_stats(seconds: Sequence[float], batch: int) -> dict[str, float]:
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    stats = {
        "n": int(ms.size),
        "mean_ms": float(ms.mean()),
        "std_ms": float(ms.std(ddof=1)) if ms.size > 1 else 0.0,
        "min_ms": float(ms.min()),
        "max_ms": float(ms.max()),
    }
    for p in PERCENTILES:
        stats[f"p{p}_ms"] = float(np.percentile(ms, p))
    stats["throughput_ips"] = batch / (stats["mean_ms"] / 1e3)
    return stats


def speedup_interval(baseline_rounds: Sequence[float], model_rounds: Sequence[float], level: float = 0.95) -> dict:
    """Geometric-mean speedup (baseline time / model time) over rounds, with a t-interval on the log ratios."""
    from scipy import stats as st

    logs = np.log(np.asarray(baseline_rounds, dtype=np.float64) / np.asarray(model_rounds, dtype=np.float64))
    mean = float(logs.mean())
    half = float(st.t.ppf(0.5 + level / 2, logs.size - 1) * logs.std(ddof=1) / math.sqrt(logs.size))
    return {
        "speedup": math.exp(mean),
        "ci_low": math.exp(mean - half),
        "ci_high": math.exp(mean + half),
        "level": level,
        "rounds": int(logs.size),
        "per_round": [float(math.exp(v)) for v in logs],
    }


# -- the machine ------------------------------------------------------------------------------------------------
def _cpu_busy_seconds() -> float | None:
    """Seconds of CPU time all processes have used since boot (from /proc/stat), or None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class LoadMeter:
    """How busy the machine was during a block, and how much of that was other processes than this one."""

    def __enter__(self) -> LoadMeter:
        self.wall0, self.own0, self.busy0 = time.perf_counter(), time.process_time(), _cpu_busy_seconds()
        self.loadavg0 = os.getloadavg()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.own = time.process_time() - self.own0
        busy1 = _cpu_busy_seconds()
        self.busy = None if busy1 is None or self.busy0 is None else busy1 - self.busy0
        self.loadavg1 = os.getloadavg()

    def report(self) -> dict[str, Any]:
        cores = os.cpu_count() or 1
        others = None if self.busy is None else max(0.0, self.busy - self.own) / self.wall
        return {
            "wall_seconds": self.wall,
            "own_cpu_seconds": self.own,
            "machine_busy_cores": None if self.busy is None else self.busy / self.wall,
            "other_processes_busy_cores": others,
            "other_processes_fraction": None if others is None else others / cores,
            "loadavg_start": list(self.loadavg0),
            "loadavg_end": list(self.loadavg1),
        }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # not installed
        return None


def environment(settings: BenchSettings, providers_used: dict[str, list[str]]) -> dict[str, Any]:
    from .. import __version__

    return {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "machine": platform.machine(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            "nenni_deploy": __version__,
            "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
            "onnx": _version("onnx"),
            "torch": _version("torch"),
            "numpy": _version("numpy"),
        },
        "provider": settings.provider,
        "providers_used": providers_used,
        "intra_op_threads": settings.intra_threads,
        "inter_op_threads": 1,
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
    }


# -- running ----------------------------------------------------------------------------------------------------
class _Timed:
    """An active runner reduced to one call: run the session on a fixed input, nothing else timed."""

    def __init__(self, subject: Subject, settings: BenchSettings, batch: int, rng: np.random.Generator) -> None:
        self.runner = open_runner(
            subject.loaded, provider=settings.provider, threads=settings.intra_threads, inter_op_threads=1
        )
        self.runner.activate()
        x = rng.random(subject.input_shape(batch), dtype=np.float32)
        self.call = self.runner.bound(x)  # validated once, outside the timed loop
        self.call()

    def once(self) -> float:
        start = time.perf_counter()
        self.call()
        return time.perf_counter() - start

    def chunk(self, n: int) -> list[float]:
        return [self.once() for _ in range(n)]

    def providers(self) -> list[str]:
        return self.runner.providers_used()

    def close(self) -> None:
        self.runner.deactivate()


class _TimedPlan:
    """A TensorRT engine: CUDA events around the engine alone, input already on the device (TensorRTRunner)."""

    def __init__(self, subject: Subject, batch: int, rng: np.random.Generator) -> None:
        self.runner = subject.plan
        self.x = rng.random(subject.input_shape(batch), dtype=np.float32)

    def once(self) -> float:
        return self.chunk(1)[0]

    def chunk(self, n: int) -> list[float]:
        return self.runner.time_batches(self.x, iterations=n, warmup_seconds=0.0)

    def providers(self) -> list[str]:
        return ["TensorRT"]

    def close(self) -> None:
        """The engine stays active for the next batch size; `Subject.close` releases it."""


def _warm(timed: list[_Timed], seconds: float) -> list[float]:
    """Alternate the models for `seconds` each (at least 3 runs each); return each one's median latency."""
    samples: list[list[float]] = [[] for _ in timed]
    slices = 4
    for _ in range(slices):
        for i, t in enumerate(timed):
            end = time.perf_counter() + seconds / slices
            while True:
                samples[i].append(t.once())
                if time.perf_counter() >= end and len(samples[i]) >= 3:
                    break
    return [float(np.median(s)) for s in samples]


def bench_batch(
    subjects: list[Subject], batch: int, settings: BenchSettings, tick: Callable[[], None] | None = None
) -> dict[str, Any]:
    """Interleaved timing of every subject at one batch size: per-iteration latencies, round by round."""
    rng = np.random.default_rng(settings.seed)
    timed = [_TimedPlan(s, batch, rng) if s.is_plan else _Timed(s, settings, batch, rng) for s in subjects]
    try:
        typical = _warm(timed, settings.warmup)
        if settings.iterations is not None:
            per_round = [math.ceil(settings.iterations / settings.rounds)] * len(timed)
        else:
            per_round = [max(1, round(settings.duration / settings.rounds / t)) for t in typical]
        latencies: list[list[float]] = [[] for _ in timed]
        round_means: list[list[float]] = [[] for _ in timed]
        with LoadMeter() as load:
            for _ in range(settings.rounds):
                for i, t in enumerate(timed):
                    chunk = t.chunk(per_round[i])
                    latencies[i].extend(chunk)
                    round_means[i].append(float(np.mean(chunk)))
                if tick:
                    tick()
        providers = {s.label: t.providers() for s, t in zip(subjects, timed, strict=True)}
    finally:
        for t in timed:
            t.close()
    result: dict[str, Any] = {
        "batch": batch,
        "iterations_per_round": {s.label: n for s, n in zip(subjects, per_round, strict=True)},
        "models": {
            s.label: {**latency_stats(lat, batch), "round_means_ms": [m * 1e3 for m in rm]}
            for s, lat, rm in zip(subjects, latencies, round_means, strict=True)
        },
        "load": load.report(),
        "providers_used": providers,
    }
    if len(subjects) > 1 and subjects[-1].label == "baseline":  # each model's speedup over the baseline
        result["speedups"] = {
            s.label: speedup_interval(round_means[-1], round_means[i]) for i, s in enumerate(subjects[:-1])
        }
    return result


def ideal_speedups(model: Subject, baseline: Subject | None) -> dict[str, float | None]:
    """What the MAC and BitOPs counts promise for `model` over `baseline` as both run (`cost_as_run`); without a
    baseline, over the model's own dense form at the model's precision."""
    mine = model.as_run()
    ref = baseline.as_run() if baseline is not None else cost_as_run(model.cost, dense=True, precision=model.precision)
    mac = ref["macs"] / mine["macs"] if ref["macs"] and mine["macs"] else None
    bitops = ref["bitops"] / mine["bitops"] if ref["bitops"] and mine["bitops"] else None
    return {"mac": mac, "bitops": bitops}


def _ideal_entry(speedup: float, ideal: dict[str, float | None]) -> dict[str, float | None]:
    return {
        "mac_speedup": ideal["mac"],
        "bitops_speedup": ideal["bitops"],
        "fraction_of_mac_ideal": speedup / ideal["mac"] if ideal["mac"] else None,
        "fraction_of_bitops_ideal": speedup / ideal["bitops"] if ideal["bitops"] else None,
    }


def model_labels(paths: Sequence[str | os.PathLike]) -> list[str]:
    """`model` for one model; the file names (made unique) for several."""
    if len(paths) == 1:
        return ["model"]
    labels: list[str] = []
    for path in paths:
        base = Path(path).name.removesuffix(".onnx").removesuffix(".plan") or "model"
        label, i = base, 2
        while label in labels or label == "baseline":
            label, i = f"{base}-{i}", i + 1
        labels.append(label)
    return labels


def run_bench(
    model_path: str | os.PathLike | Sequence[str | os.PathLike],
    baseline_path: str | os.PathLike | None,
    settings: BenchSettings,
    *,
    progress: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """The whole benchmark: every batch size, every model and the baseline interleaved round by round, optional
    profile; a JSON-ready report. `model_path` is one file or several (each gets its speedup over the baseline).

    A baseline must be the same classifier's dense form as every model (`check_pair`) unless `force`."""
    settings.validate()
    paths = [model_path] if isinstance(model_path, (str, os.PathLike)) else list(model_path)
    if not paths:
        raise NenniError("nenni bench needs at least one model")
    subjects: list[Subject] = []
    try:
        for label, path in zip(model_labels(paths), paths, strict=True):
            subjects.append(Subject.load(label, path))
        baseline = Subject.load("baseline", baseline_path) if baseline_path is not None else None
    except BaseException:
        for s in subjects:
            s.close()
        raise
    models = list(subjects)
    subjects += [baseline] if baseline else []
    try:
        pairings = {m.label: check_pair(m, baseline, force=force) for m in models} if baseline else None
        report = _run(models, baseline, subjects, settings, progress)
        if pairings is not None:
            report["pairing"] = pairings[models[0].label]  # the first model's, as in schema 1
            report["pairings"] = pairings
        return report
    finally:
        for s in subjects:
            s.close()


def _output_width(subject: Subject) -> int | None:
    if subject.loaded is None:
        return None
    dims = subject.loaded.proto.graph.output[0].type.tensor_type.shape.dim
    return dims[-1].dim_value if len(dims) == 2 and dims[-1].HasField("dim_value") else None


def check_pair(model: Subject, baseline: Subject, *, force: bool = False) -> dict[str, Any]:
    """A speedup means something only against the same classifier: the same input and output shapes, and the
    baseline's weights must be the dense model the candidate was made from (the hashes exports record)."""
    problems = []
    shapes = [s.image_shape() for s in (model, baseline)]
    if shapes[0] != shapes[1]:
        problems.append(f"inputs differ ({'x'.join(map(str, shapes[0]))} vs {'x'.join(map(str, shapes[1]))})")
    widths = [_output_width(s) for s in (model, baseline)]
    if None not in widths and widths[0] != widths[1]:
        problems.append(f"outputs differ ({widths[0]} vs {widths[1]} classes)")
    base = model.metadata.get("nenni.base_weights_sha256") or ""
    theirs = {baseline.metadata.get("nenni.base_weights_sha256") or ""}
    if baseline.metadata.get("nenni.kind", "dense") == "dense" and baseline.metadata.get("nenni.dense") != "true":
        theirs.add(baseline.metadata.get("nenni.weights_sha256") or "")
    theirs.discard("")
    verified = bool(base and theirs)
    if verified and base not in theirs:
        problems.append("the baseline is not the dense model the candidate was made from (dense-base hashes differ)")
    if problems and not force:
        raise NenniError(f"--baseline {baseline.path} does not match {model.path}: {'; '.join(problems)} (--force)")
    return {"verified": verified and not problems, "forced": bool(problems), "problems": problems}


def _run(
    models: list[Subject], baseline: Subject | None, subjects: list[Subject], settings: BenchSettings, progress: bool
) -> dict[str, Any]:
    if any(s.is_plan for s in subjects) and settings.profile:
        raise NenniError("--profile profiles ONNX Runtime sessions; for engines use nsys or trtexec --dumpProfile")
    for b in settings.batches:  # shape errors before any timing
        for s in subjects:
            s.input_shape(b)
    from tqdm import tqdm

    bar = tqdm(
        total=len(settings.batches) * settings.rounds, desc="bench", unit="round", disable=not progress, leave=False
    )
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    batches = []
    try:
        for b in settings.batches:
            batches.append(bench_batch(subjects, b, settings, tick=bar.update))
    finally:
        bar.close()
    ideals = {m.label: ideal_speedups(m, baseline) for m in models}
    ideal = ideals[models[0].label]
    for entry in batches:
        if baseline is None:
            continue
        entry["ideals"] = {}
        for m in models:
            sp = entry["speedups"][m.label]["speedup"]
            entry["ideals"][m.label] = _ideal_entry(sp, ideals[m.label])
        entry["speedup"] = entry["speedups"][models[0].label]  # the first model's, as in schema 1
        entry["ideal"] = entry["ideals"][models[0].label]
    report: dict[str, Any] = {
        "schema": "nenni-bench",
        "schema_version": SCHEMA_VERSION,
        "started_utc": started,
        "settings": {**asdict(settings), "batches": list(settings.batches), "threads": settings.intra_threads},
        "models": {s.label: s.describe() for s in subjects},
        "ideal": ideal,
        "ideals": ideals,
        "batches": batches,
        "environment": environment(settings, batches[-1]["providers_used"] if batches else {}),
    }
    if settings.provider == "cpu":  # after the timing: a layout that MACs do not explain
        report["layout"] = {s.label: cpu_conv_layout(s.loaded.proto).to_json() for s in subjects if s.loaded}
    if settings.profile:
        report["profile"] = {
            s.label: {
                str(b): op_profile.profile_model(s.loaded, b, s.input_shape(b), settings) for b in settings.batches
            }
            for s in subjects
        }
    return report
