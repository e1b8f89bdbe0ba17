"""Operator profile of an ONNX model in ONNX Runtime, with time split into the NENNI stages.

The function bodies name every node after its stage (`exporters.ops.STAGES`); ONNX Runtime keeps those names,
prefixed by the calling node's name, when it inlines the functions, so each kernel's time is attributed to
projection, approximator, selection, exact essential compute, fill, noise, or the rest of the network.
Profiling adds overhead of its own: these shares explain the timed benchmark, they do not replace it.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ..exporters.ops import STAGES
from ..runtime.loading import LoadedModel
from ..runtime.runners import open_runner

_STAGE = re.compile(r"(?:^|[_/.])(" + "|".join(STAGES) + r")\.[A-Za-z]+_\d+")


def stage_of(node_name: str) -> str:
    """The NENNI stage a (possibly inlined) node belongs to, or 'rest'."""
    m = _STAGE.search(node_name)
    return m.group(1) if m else "rest"


def parse_trace(events: list[dict[str, Any]], runs: int) -> dict[str, Any]:
    """Per-run kernel time by stage and by operator type, from an ORT profiling trace."""
    by_stage: dict[str, float] = defaultdict(float)
    by_op: dict[str, float] = defaultdict(float)
    kernels = 0
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        node = e["name"][: -len("_kernel_time")]
        dur_ms = float(e.get("dur", 0)) / 1e3 / runs
        by_stage[stage_of(node)] += dur_ms
        by_op[str(e.get("args", {}).get("op_name", "?"))] += dur_ms
        kernels += 1
    total = sum(by_stage.values())
    share = {k: (v / total if total else 0.0) for k, v in by_stage.items()}
    return {
        "kernel_ms_per_run": total,
        "kernels_per_run": kernels / runs if runs else 0,
        "stage_ms": dict(sorted(by_stage.items(), key=lambda kv: -kv[1])),
        "stage_share": dict(sorted(share.items(), key=lambda kv: -kv[1])),
        "op_ms": dict(sorted(by_op.items(), key=lambda kv: -kv[1])[:15]),
    }


def profile_model(loaded: LoadedModel, batch: int, shape: tuple[int, ...], settings) -> dict[str, Any]:
    """One warm-up run and `settings.profile_iterations` runs under ORT's profiler; the trace summarised per
    run (the warm-up's events, which end at the first `model_run` event, are dropped)."""
    import onnxruntime as ort

    runs = max(1, int(settings.profile_iterations))
    with tempfile.TemporaryDirectory(prefix="nenni-profile-") as tmp:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        runner = open_runner(
            loaded,
            provider=settings.provider,
            threads=settings.intra_threads,
            inter_op_threads=1,
            session_options=options,
        )
        x = np.random.default_rng(settings.seed).random(shape, dtype=np.float32)
        with runner:
            call = runner.bound(x)
            call()  # warm-up, recorded; removed below
            start = time.perf_counter()
            for _ in range(runs):
                call()
            wall = (time.perf_counter() - start) / runs
            trace = Path(runner.end_profiling())
        events = json.loads(trace.read_text())
    ends = [i for i, e in enumerate(events) if e.get("name") == "model_run"]
    if len(ends) > runs:
        events = events[ends[0] + 1 :]
    summary = parse_trace(events, runs)
    summary["wall_ms_per_run_profiled"] = wall * 1e3
    summary["runs"] = runs
    return summary
