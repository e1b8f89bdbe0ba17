"""The TensorRT backend without TensorRT: pure shape/type/launch rules, plugin attribute parsing, ORT provider
options, engine-build plumbing (profiles, parser error lines, atomic plan writes), `nenni build` and
`nenni export --target tensorrt` on the command line. Tests that need TensorRT or a GPU skip with the reason."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from test_export_support import TINY_SHAPE, tiny_nenni

from nenni_deploy.cli import main
from nenni_deploy.errors import NenniError
from nenni_deploy.exporters import graph, ops
from nenni_deploy.exporters.export import ExportOptions, build_onnx
from nenni_deploy.nenni.io import save_model_dir
from nenni_deploy.runtime import OrtRunner, providers
from nenni_deploy.runtime.tensorrt import build, launch, plugins
from nenni_deploy.runtime.tensorrt.launch import LayerAttrs

HAS_TRT = plugins.tensorrt_available()
HAS_GPU = torch.cuda.is_available()
needs_trt_gpu = pytest.mark.skipif(not (HAS_TRT and HAS_GPU), reason="needs TensorRT >= 10.7 and a CUDA GPU")


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    text = result.output.strip()
    assert text.startswith("Error:") and len(text.splitlines()) == 1, text
    for fragment in fragments:
        assert fragment in text, text


# -- pure rules -------------------------------------------------------------------------------------------------
def conv_attrs(**kw):
    base = dict(granularity="channel", rank="signed", k=4, nm=[2, 4], threshold=0.0)
    base.update(strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1])
    base.update(kw)
    return LayerAttrs.parse(**base)


@pytest.mark.parametrize(
    "x, w, geometry, expected",
    [
        ((2, 3, 12, 12), (16, 3, 3, 3), dict(), (2, 16, 12, 12)),
        ((2, 16, 12, 12), (32, 16, 3, 3), dict(strides=[2, 2]), (2, 32, 6, 6)),
        ((1, 8, 7, 9), (4, 8, 3, 3), dict(pads=[0, 0, 0, 0], dilations=[2, 1]), (1, 4, 3, 7)),
        ((5, 8, 8, 8), (4, 8, 1, 1), dict(pads=[0, 0, 0, 0]), (5, 4, 8, 8)),
    ],
)
def test_output_shapes_match_torch(x, w, geometry, expected):
    attrs = conv_attrs(**geometry)
    assert launch.layer_output_shape(x, w, attrs) == expected
    ph, pw = attrs.pads[0], attrs.pads[1]
    y = torch.nn.functional.conv2d(torch.zeros(x), torch.zeros(w), None, attrs.strides, (ph, pw), attrs.dilations)
    assert tuple(y.shape) == expected
    assert launch.layer_output_shape((7, 32), (10, 32)) == (7, 10)


class Sym:
    """A stand-in for TensorRT's symbolic shape expression: the shape rules use only + - * //."""

    def __init__(self, text):
        self.text = text

    def _op(self, other, sym):
        return Sym(f"({self.text} {sym} {other.text if isinstance(other, Sym) else other})")

    __add__ = lambda self, o: self._op(o, "+")  # noqa: E731
    __sub__ = lambda self, o: self._op(o, "-")  # noqa: E731
    __mul__ = lambda self, o: self._op(o, "*")  # noqa: E731
    __floordiv__ = lambda self, o: self._op(o, "//")  # noqa: E731


def test_shape_rules_work_on_symbolic_dimensions():
    shape = launch.layer_output_shape([Sym("B"), 3, Sym("H"), Sym("W")], [16, 3, 3, 3], conv_attrs(strides=[2, 2]))
    assert shape[0].text == "B" and shape[1] == 16
    h = shape[2].text
    assert eval(h, {"H": 32}) == 16 and eval(shape[3].text, {"W": 31}) == 16


def test_type_combinations_cover_inputs_and_outputs():
    assert launch.type_combination(ops.CONV) == "FP32, FP32, FP32, FP32, FP32, FP32, FP32, INT32"
    assert launch.type_combination(ops.LINEAR).count(",") == 7
    assert launch.type_combination(ops.NOISE) == "FP32, INT32, FP32"
    assert "BOOL" not in launch.LAYER_TYPES + launch.NOISE_TYPES  # TensorRT plugins take no bool tensors


def test_attribute_parsing_accepts_plugin_field_forms_and_refuses_bad_values():
    a = LayerAttrs.parse(
        granularity=b"nm",
        rank="magnitude",
        k=np.int32(3),
        nm=np.array([2, 4], dtype=np.int32),
        threshold=np.float32(0.5),
    )
    assert (a.granularity, a.magnitude, a.k, a.nm, a.threshold) == ("nm", True, 3, (2, 4), 0.5)
    assert a.strides == (1, 1) and a.pads == (0, 0, 0, 0)
    for bad, match in [
        (dict(granularity="block"), "granularity"),
        (dict(rank="abs"), "rank"),
        (dict(k=0), "k >= 1"),
        (dict(nm=[4, 4]), "0 < N < M"),
        (dict(strides=[1]), "strides"),
        (dict(strides=[0, 1]), "positive"),
    ]:
        with pytest.raises(NenniError, match=match):
            conv_attrs(**bad)
    with pytest.raises(NenniError, match="k = 9"):
        conv_attrs(k=9).check_channels(8)
    with pytest.raises(NenniError, match="multiple of M"):
        conv_attrs(granularity="nm", nm=[2, 4]).check_channels(10)


def test_noise_seed_rule():
    assert launch.noise_seed(ops.UNSEEDED, fallback=99) == 99
    assert launch.noise_seed(42.0, fallback=99) == 42
    with pytest.raises(NenniError, match="integer"):
        launch.noise_seed(1.5, fallback=0)


def test_channel_plan_computes_only_the_selected_filters():
    attrs = conv_attrs(k=8)
    plan = launch.layer_plan((4, 16, 12, 12), (64, 16, 3, 3), (16, 16, 3, 3), attrs)
    steps = dict(plan.launches())
    assert list(steps) == ["projection", "approximator", "scores", "rank", "compact", "exact_selected", "mask"]
    # the exact convolution's grid covers K = 8 rows per sample, not n = 64
    assert steps["exact_selected"].grid == (4 * launch.cdiv(8, launch.BLOCK_SLOTS), launch.cdiv(144, 64))
    assert steps["approximator"].grid[0] == 4 * launch.cdiv(64, launch.BLOCK_SLOTS)
    assert plan.scratch_elements() == {"u": 4 * 16 * 144, "scores": 4 * 64, "selected": 4 * 64, "indices": 4 * 8}
    dense = launch.layer_plan((4, 16, 12, 12), (64, 16, 3, 3), (16, 16, 3, 3), conv_attrs(granularity="element"))
    assert [s for s, _ in dense.launches()][-3:] == ["exact_dense", "group_mask", "combine"]
    assert "exact" in dense.scratch_elements()
    linear = launch.layer_plan((3, 32), (10, 32), (8, 32), LayerAttrs.parse(
        granularity="threshold", rank="signed", k=1, nm=[2, 4], threshold=0.1))  # fmt: skip
    assert linear.positions == 1 and linear.launches()[0][1].blocks["BLOCK_P"] == launch.BLOCK_POSITIONS_SMALL
    assert [name for name, _ in launch.noise_launches(100)] == ["draw", "advance"]
    assert launch.elementwise_launch(0).grid == (1, 1) and launch.conv_rows_launch(2, 33, 10).threads == 128


def test_plugin_table_matches_what_the_exporter_writes():
    model, card = tiny_nenni("nm", "gaussian")
    proto = build_onnx(model, card, TINY_SHAPE, ExportOptions(target="tensorrt")).proto
    for node in graph.nenni_nodes(proto):
        spec = ops.PLUGIN_SPECS[node.op_type]
        names = {a.name for a in node.attribute} - set(ops.PLUGIN_ATTRIBUTES)
        assert names == set(spec.attributes), node.op_type
        assert len(node.input) == spec.inputs and len(node.output) <= spec.outputs
    assert plugins.PLUGIN_IDS == ("nenni::NenniConv", "nenni::NenniLinear", "nenni::NenniNoise")


# -- ORT provider options ---------------------------------------------------------------------------------------
def test_provider_options(tmp_path):
    gpu = providers.GpuSettings(
        device_id=1, fp16=True, engine_cache_dir=tmp_path / "cache", workspace_mib=512, cuda_graph=True,
        profile_min={"images": (1, 3, 32, 32)}, profile_opt={"images": (32, 3, 32, 32)},
        profile_max={"images": (256, 3, 32, 32)},
    )  # fmt: skip
    (trt_name, trt), (cuda_name, cuda), cpu = providers.provider_list(
        ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], gpu
    )
    assert (trt_name, cuda_name, cpu) == ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    assert trt["trt_fp16_enable"] == "True" and trt["device_id"] == "1"
    assert trt["trt_engine_cache_enable"] == "True" and trt["trt_engine_cache_path"] == str(tmp_path / "cache")
    assert trt["trt_max_workspace_size"] == str(512 << 20) and trt["trt_cuda_graph_enable"] == "True"
    assert trt["trt_profile_min_shapes"] == "images:1x3x32x32" and trt["trt_profile_max_shapes"] == "images:256x3x32x32"
    assert "trt_extra_plugin_lib_paths" not in trt
    assert cuda == {"device_id": "1", "cudnn_conv_algo_search": "EXHAUSTIVE", "do_copy_in_default_stream": "1",
                    "enable_cuda_graph": "1"}  # fmt: skip
    lib = tmp_path / "libplugins.so"
    lib.write_bytes(b"")
    with_lib = providers.tensorrt_options(providers.GpuSettings(plugin_libs=[lib, lib]))
    assert with_lib["trt_extra_plugin_lib_paths"] == f"{lib};{lib}"
    for bad, match in [
        (dict(plugin_libs=[tmp_path / "missing.so"]), "does not exist"),
        (dict(profile_min={"images": (1,)}), "all three"),
        (dict(workspace_mib=0), "workspace"),
        (dict(conv_algo_search="FAST"), "conv algo"),
    ]:
        with pytest.raises(NenniError, match=match):
            providers.provider_list(["CPUExecutionProvider"], providers.GpuSettings(**bad))


def test_ort_runner_takes_gpu_settings_additively(tmp_path):
    model, card = tiny_nenni("channel")
    proto = build_onnx(model, card, TINY_SHAPE, ExportOptions()).proto
    x = torch.rand(2, *TINY_SHAPE).numpy()
    with OrtRunner(proto, provider="cpu", threads=1) as plain:
        expected = plain.infer(x)["logits"]
    gpu = providers.GpuSettings(engine_cache_dir=tmp_path / "cache")
    with pytest.warns(RuntimeWarning):  # no CUDA provider in this onnxruntime build: falls back, says so
        with OrtRunner(proto, provider="cuda", threads=1, gpu=gpu) as runner:
            np.testing.assert_allclose(runner.infer(x)["logits"], expected, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "cache").is_dir()


# -- building ---------------------------------------------------------------------------------------------------
def test_build_options_and_profiles():
    options = build.BuildOptions(min_batch=1, opt_batch=8, max_batch=64)
    options.validate()
    assert build.profile_shapes(["batch", 3, 32, 32], options) == ((1, 3, 32, 32), (8, 3, 32, 32), (64, 3, 32, 32))
    assert build.profile_shapes([4, 3, 8, 8], options) == ((4, 3, 8, 8),) * 3
    with pytest.raises(NenniError, match="static dimensions"):
        build.profile_shapes(["batch", 3, "h", 32], options)
    with pytest.raises(NenniError, match="min-batch"):
        build.BuildOptions(min_batch=8, opt_batch=4).validate()
    with pytest.raises(NenniError, match="workspace"):
        build.BuildOptions(workspace_mib=0).validate()


def test_parser_errors_become_one_line_naming_the_nodes():
    def error(name, op, desc):
        return SimpleNamespace(node_name=lambda: name, node_operator=lambda: op, node=lambda: 3, desc=lambda: desc)

    errors = [error("block.conv1", "NenniConv", "Plugin not found, are the plugin name, version, and namespace "
                    "correct?\nmore"), error("", "", "graph-level problem")] * 4  # fmt: skip
    line = build.format_parser_errors(errors, "m.onnx")
    assert "\n" not in line and line.startswith("TensorRT's ONNX parser rejected m.onnx: ")
    assert "node block.conv1 (NenniConv): Plugin not found" in line and "the graph: graph-level problem" in line
    assert line.endswith("(and 3 more)")


def test_plan_metadata_sidecar(tmp_path):
    from nenni_deploy.runtime.tensorrt.runner import TensorRTRunner

    plan = tmp_path / "m.plan"
    build.write_plan_atomic(b"engine", plan)
    result = build.BuildResult(plan, 6, 1.0, "images", ((1, 1, 8, 8),) * 3, build.BuildOptions(), "10.x")
    build.write_plan_metadata(plan, {"nenni.cost": '{"macs": 1}'}, result)
    meta = build.read_plan_metadata(plan)
    assert meta["format"] == "nenni-plan" and meta["build"]["profile"] == [[1, 1, 8, 8]] * 3
    assert TensorRTRunner(plan).metadata == {"nenni.cost": '{"macs": 1}'}
    assert build.read_plan_metadata(tmp_path / "other.plan") == {}


def test_plan_is_written_atomically(tmp_path, monkeypatch):
    out = tmp_path / "sub" / "m.plan"
    assert build.write_plan_atomic(b"engine", out) == 6 and out.read_bytes() == b"engine"
    before = sorted(p.name for p in out.parent.iterdir())

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(build.os, "replace", full_disk)
    with pytest.raises(NenniError, match="No space left"):
        build.write_plan_atomic(b"x" * 1000, tmp_path / "sub" / "other.plan")
    monkeypatch.undo()
    assert sorted(p.name for p in out.parent.iterdir()) == before  # no temporary or partial file left
    with pytest.raises(NenniError, match="directory"):
        build.write_plan_atomic(b"x", tmp_path)


def _small_cnn_dir(root):
    from test_export_support import small_cnn_nenni

    model, _, config, specs = small_cnn_nenni("channel", "gaussian")
    return save_model_dir(root / "nenni", model, source="small_cnn", config=config, specs=specs)


@pytest.fixture(scope="module")
def cli_exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("trt-cli")
    model_dir = _small_cnn_dir(root)
    trt_path, ort_path = root / "trt.onnx", root / "ort.onnx"
    result = cli("export", model_dir, "--out", trt_path, "--target", "tensorrt", "--check-n", 32)
    assert result.exit_code == 0, result.output
    assert "TensorRT check: every node" in result.output
    assert cli("export", model_dir, "--out", ort_path, "--check-n", 32).exit_code == 0
    return root, trt_path, ort_path


@pytest.mark.skipif(HAS_TRT, reason="checks the message shown where TensorRT is absent")
def test_build_without_tensorrt_is_one_line_naming_the_extra(cli_exports):
    root, trt_path, _ = cli_exports
    out = root / "m.plan"
    one_line_error(cli("build", trt_path, "--out", out), "TensorRT is not available", "pip install -e '.[tensorrt]'")
    assert not out.exists() and not [p for p in root.iterdir() if p.name.startswith(".m.plan")]


def test_build_refuses_bad_input_before_touching_tensorrt(cli_exports):
    root, trt_path, ort_path = cli_exports
    out = root / "bad.plan"
    one_line_error(cli("build", ort_path, "--out", out), "ONNX Runtime export", "--target tensorrt")
    one_line_error(cli("build", root / "missing.onnx", "--out", out), "no such file")
    one_line_error(cli("build", trt_path, "--out", out, "--min-batch", 8, "--opt-batch", 4), "min-batch")
    (root / "junk.onnx").write_bytes(b"not onnx")
    one_line_error(cli("build", root / "junk.onnx", "--out", out), "not a valid ONNX model")
    shadowed = onnx.load(trt_path)
    node = graph.nenni_nodes(shadowed, (ops.CONV,))[0]
    shadowed.functions.append(ops.function_for_node(node, graph.model_opset(shadowed)))
    onnx.save(shadowed, root / "shadowed.onnx")
    one_line_error(cli("build", root / "shadowed.onnx", "--out", out), "not ready for TensorRT", node.name, "shadows")
    assert not out.exists()


def test_export_refuses_a_graph_tensorrt_cannot_import(monkeypatch, cli_exports):
    root = cli_exports[0]
    from nenni_deploy.exporters import tensorrt_check

    monkeypatch.delitem(tensorrt_check.NATIVE_OPS, "Relu")  # as if the parser lacked an op the model uses
    result = cli("export", root / "nenni", "--out", root / "refused.onnx", "--target", "tensorrt", "--no-check")
    one_line_error(result, "not ready for TensorRT", "(Relu): not supported")
    assert not (root / "refused.onnx").exists()


def test_importing_the_package_and_cli_does_not_import_tensorrt():
    code = (
        "import sys, nenni_deploy, nenni_deploy.cli, nenni_deploy.runtime, nenni_deploy.runtime.tensorrt.build, "
        "nenni_deploy.runtime.tensorrt.runner, nenni_deploy.runtime.tensorrt.plugins, nenni_deploy.cli.build; "
        "bad = [m for m in ('tensorrt', 'triton', 'cuda', 'cupy', 'polygraphy') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- TensorRT and a GPU ---------------------------------------------------------------------------------------
@needs_trt_gpu
def test_engine_matches_onnx_runtime_and_times_batches(cli_exports):
    from nenni_deploy.runtime import load_onnx_checked
    from nenni_deploy.runtime.tensorrt.runner import TensorRTRunner

    root, trt_path, ort_path = cli_exports
    plan = root / "m.plan"
    assert cli("build", trt_path, "--out", plan, "--max-batch", 64).exit_code == 0
    x = np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32)
    with TensorRTRunner(plan) as runner, OrtRunner(graph.without_noise(load_onnx_checked(ort_path).proto)) as ort:
        assert runner.infer(x)["logits"].shape == ort.infer(x)["logits"].shape
        for graphs in (False, True):
            seconds = runner.time_batches(x, iterations=5, warmup_seconds=0.1, cuda_graph=graphs)
            assert len(seconds) == 5 and all(s > 0 for s in seconds)


# -- the plugin definitions, against a recording stand-in for tensorrt.plugin -------------------------------------
def test_plugin_definitions_follow_the_op_table(monkeypatch):
    import inspect

    import numpy.typing as npt
    from _fake_tensorrt import Tensor, TensorDesc, install

    registry = install(monkeypatch)
    assert set(registry) == set(plugins.PLUGIN_IDS)
    annotation = {"str": str, "int": int, "float": float, "ints": npt.NDArray[np.int32]}
    for op_type, spec in ops.PLUGIN_SPECS.items():
        fns = registry[spec.plugin_id]
        assert set(fns) == {"register", "autotune", "impl"}
        params = list(inspect.signature(fns["register"]).parameters.values())
        inputs, attributes = params[: spec.inputs], params[spec.inputs :]
        assert all(p.annotation is TensorDesc for p in inputs)  # real types, not strings
        assert {p.name: p.annotation for p in attributes} == {n: annotation[k] for n, k in spec.attributes.items()}
        impl = list(inspect.signature(fns["impl"]).parameters.values())
        assert [p.name for p in impl[-2:]] == ["outputs", "stream"]
        assert all(p.annotation is Tensor for p in impl[: spec.inputs])
        assert {p.name for p in impl[spec.inputs : -2]} <= set(spec.attributes)
        descs = [TensorDesc((2, 3, 8, 8))] * spec.inputs
        (combination,) = fns["autotune"](*descs, outputs=None)
        assert combination.types == launch.type_combination(op_type)
    conv = registry["nenni::NenniConv"]["register"]
    y, m = conv(
        TensorDesc((Sym("B"), 3, 12, 12)), TensorDesc((16, 3, 3, 3)), *[TensorDesc((1,))] * 4,
        granularity="channel", rank="signed", k=4, ratio=0.25, nm=np.array([2, 4], np.int32), threshold=0.0,
        strides=np.array([2, 2], np.int32), pads=np.array([1, 1, 1, 1], np.int32), dilations=np.array([1, 1], np.int32),
    )  # fmt: skip
    assert y.shape_expr[0].text == "B" and y.shape_expr[1:] == [16, 6, 6] and (y.dtype, m.dtype) == ("float32", "int32")
    linear = registry["nenni::NenniLinear"]["register"]
    y, m = linear(
        TensorDesc((Sym("B"), 32)), TensorDesc((10, 32)), *[TensorDesc((1,))] * 4,
        granularity="nm", rank="magnitude", k=1, ratio=0.5, nm=np.array([2, 4], np.int32), threshold=0.0,
    )  # fmt: skip
    assert y.shape_expr[1] == 10 and m.dtype == "int32"
    noise = registry["nenni::NenniNoise"]["register"]
    assert noise(TensorDesc((4, 10)), TensorDesc((4, 10)), mode="gaussian", scale=1.0, residual_rms=0.5,
                 seed=-1.0).shape_expr == [4, 10]  # fmt: skip
    with pytest.raises(NenniError, match="mode"):
        noise(TensorDesc((4, 10)), TensorDesc((4, 10)), mode="uniform", scale=1.0, residual_rms=0.5, seed=-1.0)
    with pytest.raises(NenniError, match="granularity"):
        linear(TensorDesc((2, 32)), TensorDesc((10, 32)), *[TensorDesc((1,))] * 4, granularity="block",
               rank="signed", k=1, ratio=0.5, nm=np.array([2, 4], np.int32), threshold=0.0)  # fmt: skip


def test_runner_refuses_clearly_without_an_engine_or_tensorrt(tmp_path):
    from nenni_deploy.runtime.tensorrt.runner import TensorRTRunner, warmup_iterations

    with pytest.raises(NenniError, match="no such engine file"):
        TensorRTRunner(tmp_path / "missing.plan")
    (tmp_path / "m.plan").write_bytes(b"not an engine")
    runner = TensorRTRunner(tmp_path / "m.plan")
    with pytest.raises(NenniError, match="activate"):
        runner.input_specs()
    with pytest.raises(NenniError, match="activate"):
        runner.time_batches(np.zeros((1, 1, 8, 8), np.float32), 3, 0.0)
    if not HAS_TRT:
        with pytest.raises(NenniError, match=r"pip install -e '\.\[tensorrt\]'"):
            runner.activate()
    assert warmup_iterations(0.0, 0, 0.0) and not warmup_iterations(5.0, 1, 2.0) and warmup_iterations(1.0, 3, 2.0)
