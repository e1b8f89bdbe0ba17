"""Build a TensorRT engine (.plan) from a `nenni export --target tensorrt` model.

Order: check the graph statically (`exporters.tensorrt_check`, no TensorRT needed), register the NENNI plugins,
parse with TensorRT's ONNX parser (every rejected node named), configure the builder (workspace, fp16, one
optimization profile over the dynamic batch axis), build, serialise, and write the plan under a temporary name
in the target folder before renaming it into place.

Everything before `build_engine`'s first TensorRT call is pure Python and tested here; the TensorRT calls follow
the TensorRT 10.x Python API (Builder, OnnxParser, IBuilderConfig, IOptimizationProfile).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ...errors import NenniError
from ...exporters import tensorrt_check
from ...files import atomic_output
from ..loading import LoadedModel, load_onnx_checked

MAX_ERRORS_LISTED = 5


@dataclass
class BuildOptions:
    fp16: bool = False
    min_batch: int = 1
    opt_batch: int = 32
    max_batch: int = 256
    workspace_mib: int = 1024
    verbose: bool = False

    def validate(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise NenniError(
                f"batch sizes must satisfy 1 <= --min-batch <= --opt-batch <= --max-batch, got "
                f"{self.min_batch}, {self.opt_batch}, {self.max_batch}"
            )
        if self.workspace_mib < 1:
            raise NenniError(f"--workspace must be at least 1 MiB, got {self.workspace_mib}")


def profile_shapes(
    input_shape: list[Any], options: BuildOptions, name: str = "images"
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) shapes of the optimization profile: the batch axis varies, the rest is the model's."""
    rest = list(input_shape[1:])
    if not input_shape or any(not isinstance(d, int) or d <= 0 for d in rest):
        raise NenniError(f"input {name!r} needs static dimensions after the batch axis, got {input_shape}")
    if isinstance(input_shape[0], int) and input_shape[0] > 0:
        fixed = input_shape[0]
        if not options.min_batch <= fixed <= options.max_batch:
            raise NenniError(f"input {name!r} has a fixed batch of {fixed}, outside the requested batch range")
        return (tuple(input_shape),) * 3
    return tuple((b, *rest) for b in (options.min_batch, options.opt_batch, options.max_batch))


def format_parser_errors(errors: list[Any], where: str) -> str:
    """One line naming the nodes TensorRT's parser rejected (ParserError: node(), node_name(), node_operator(),
    desc()), the first few and how many in all."""

    def get(error, method, default=""):
        fn = getattr(error, method, None)
        try:
            return fn() if callable(fn) else default
        except Exception:  # the bindings raise on fields an error does not carry
            return default

    parts = []
    for error in errors[:MAX_ERRORS_LISTED]:
        name, op, index = get(error, "node_name"), get(error, "node_operator"), get(error, "node", -1)
        node = f"node {name or index} ({op})" if (name or op) else "the graph"
        desc = str(get(error, "desc") or error).strip().splitlines()
        parts.append(f"{node}: {desc[0] if desc else 'rejected'}")
    more = f" (and {len(errors) - MAX_ERRORS_LISTED} more)" if len(errors) > MAX_ERRORS_LISTED else ""
    return f"TensorRT's ONNX parser rejected {where}: " + "; ".join(parts) + more


def write_plan_atomic(data: bytes | memoryview, out: Path) -> int:
    """Write bytes beside `out` under a temporary name, then rename: a failure leaves no half-written plan."""
    out = Path(out)
    with atomic_output(out) as tmp:
        tmp.write_bytes(data)
    return out.stat().st_size


def check_for_tensorrt(model: LoadedModel) -> None:
    """A NENNI model must be the TensorRT-target export (plugins, no local functions); a dense one may be either."""
    where = str(model.path or "the model")
    if model.is_nenni and model.target != "tensorrt":
        raise NenniError(f"{where} is an ONNX Runtime export; export it with --target tensorrt for `nenni build`")
    tensorrt_check.check_tensorrt_graph(model.proto, where)


@dataclass
class BuildResult:
    out: Path
    bytes: int
    seconds: float
    input_name: str
    profile: tuple
    options: BuildOptions
    tensorrt_version: str

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        d["profile"] = [list(s) for s in self.profile]
        return d


def build_engine(onnx_path: str | os.PathLike, out: str | os.PathLike, options: BuildOptions) -> BuildResult:
    """Parse, build and serialise; NenniError (one line) for every failure a user can act on."""
    from .plugins import register, require_tensorrt

    options.validate()
    model = load_onnx_checked(onnx_path, require_functions=False)
    check_for_tensorrt(model)
    if len(model.inputs) != 1:
        raise NenniError(f"{onnx_path}: expected one graph input, found {[i.name for i in model.inputs]}")
    spec = model.inputs[0]
    shapes = profile_shapes(spec.shape, options, spec.name)
    trt = require_tensorrt()
    register()
    start = time.perf_counter()
    logger = trt.Logger(trt.Logger.VERBOSE if options.verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    # The plugins have only a Python (JIT) implementation; say so, rather than leave the choice to the creator.
    jit = getattr(trt.NetworkDefinitionCreationFlag, "PREFER_JIT_PYTHON_PLUGINS", None)
    if jit is not None:
        flags |= 1 << int(jit)
    network = builder.create_network(flags)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file: external data resolves beside it
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        raise NenniError(format_parser_errors(errors, str(onnx_path)))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    # The plugins share scratch buffers and the noise counter, which is safe only when their launches are
    # ordered on one stream: no auxiliary streams for parallel branches.
    config.max_aux_streams = 0
    if options.fp16:
        config.set_flag(trt.BuilderFlag.FP16)  # the NENNI plugins stay in FP32 (their one type combination)
    profile = builder.create_optimization_profile()
    profile.set_shape(spec.name, *shapes)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise NenniError(f"TensorRT could not build an engine from {onnx_path} (see the messages above)")
    size = write_plan_atomic(memoryview(serialized), Path(out))
    result = BuildResult(
        out=Path(out),
        bytes=size,
        seconds=time.perf_counter() - start,
        input_name=spec.name,
        profile=shapes,
        options=options,
        tensorrt_version=str(trt.__version__),
    )
    write_plan_metadata(Path(out), model.metadata, result)
    return result


def metadata_path(plan: Path) -> Path:
    return Path(str(plan) + ".json")


def write_plan_metadata(plan: Path, onnx_metadata: dict[str, str], result: BuildResult) -> None:
    """`<plan>.json` beside the engine: the ONNX model's metadata (NENNI config, costs, weight hashes), which an
    engine file cannot carry, and how the engine was built. Benchmarks read costs and provenance from it."""
    payload = {"format": "nenni-plan", "onnx_metadata": dict(onnx_metadata), "build": result.to_dict()}
    write_plan_atomic(json.dumps(payload, indent=2, sort_keys=True).encode(), metadata_path(plan))


def read_plan_metadata(plan: str | os.PathLike) -> dict[str, Any]:
    """The sidecar written by `nenni build`, or {} when it is missing or unreadable."""
    try:
        data = json.loads(metadata_path(Path(plan)).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def describe(result: BuildResult) -> str:
    return json.dumps(result.to_dict(), indent=2)
