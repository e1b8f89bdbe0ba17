"""nenni-deploy: NENNI (noise into non-essential neurons) from PyTorch to ONNX Runtime and TensorRT.

`import nenni_deploy as nd` gives the Python API (`nenni_deploy.api`): `nd.load_model`, `nd.calibrate`,
`nd.finetune`, `nd.export_onnx`, ... It is imported on first use, so the command line starts fast.
"""

import importlib

__version__ = "0.1.0"


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    api = importlib.import_module("nenni_deploy.api")
    if name in api.__all__:
        return getattr(api, name)
    raise AttributeError(f"module 'nenni_deploy' has no attribute {name!r}")


def __dir__() -> list[str]:
    api = importlib.import_module("nenni_deploy.api")
    return sorted([*globals(), *api.__all__])
