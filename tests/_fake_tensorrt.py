"""A stand-in for the `tensorrt` and `tensorrt.plugin` modules that records what `plugins.register()` defines:
lets the tests check the plugin definitions (ids, signatures, annotations, shapes, types) and run their
implementations without TensorRT. It imitates only the documented surface the plugins use."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace


class TensorDesc:
    def __init__(self, shape, dtype="float32"):
        self.shape_expr = list(shape)
        self.ndim = len(shape)
        self.dtype = dtype

    def like(self):
        return TensorDesc(self.shape_expr, self.dtype)


class Tensor:
    pass


def install(monkeypatch):
    """Put the fakes in sys.modules; returns the registry {plugin_id: {"register"|"autotune"|"impl": function}}."""
    registry: dict[str, dict] = {}

    def decorator(kind):
        def by_id(plugin_id):
            def record(fn):
                registry.setdefault(plugin_id, {})[kind] = fn
                return fn

            return record

        return by_id

    trtp = types.ModuleType("tensorrt.plugin")
    trtp.TensorDesc, trtp.Tensor = TensorDesc, Tensor
    trtp.register, trtp.autotune, trtp.impl = decorator("register"), decorator("autotune"), decorator("impl")
    trtp.AutoTuneCombination = lambda types_, layouts="LINEAR": SimpleNamespace(types=types_, layouts=layouts)
    trtp.from_shape_expr = lambda shape, dtype: TensorDesc(shape, dtype)
    trt = types.ModuleType("tensorrt")
    trt.float32, trt.int32, trt.plugin, trt.__version__ = "float32", "int32", trtp, "10.99-fake"
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    from nenni_deploy.runtime.tensorrt import plugins

    monkeypatch.setattr(plugins, "_REGISTERED", False)
    plugins.register()
    return registry
