"""Exporting NENNI models: the `ai.nenni` ONNX ops (`ops`), the torch export (`export`), graph passes (`graph`).

Import `nenni_deploy.exporters.export` for the exporter itself (it loads torch's ONNX exporter); `ops` alone
is light and registers the op schemas with onnx on import.
"""

from __future__ import annotations

from . import ops

__all__ = ["ops"]
