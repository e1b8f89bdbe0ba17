"""Which convolutions ONNX Runtime's CPU provider runs in its blocked channel layout (NCHWc).

With all optimizations on, ORT rewrites a convolution into `com.microsoft.nchwc.Conv`, which keeps activations in
blocks of 8 (AVX2) or 16 (AVX-512) channels, when the channel counts allow it: output channels are padded to a
block, input channels must be a multiple of 4 (measured here: 4, 6, 12, 20, 28, 36, 44 blocked; 9, 10, 11, 14, 18,
22, 45, 46 not) or fewer than one block (read from the plain layout). Any other convolution stays a plain
Conv/FusedConv with layout reorders around it. On ResNet-20 pruned to widths 11/22/45
that left 9 of 19 convolutions plain and made a model with 0.70 of the MACs slower than dense; rounded to
multiples of 8 every convolution is blocked and it runs at 1.22x (docs/results.md, "Static pruning's widths").
`nenni bench` reports this per file, since it explains a speed that MACs do not.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from onnx import ModelProto

from ..exporters.graph import ort_optimized

NCHWC_DOMAIN = "com.microsoft.nchwc"
PLAIN_CONVS = frozenset({"Conv", "FusedConv"})


@dataclass
class ConvLayout:
    blocked: int  # convolutions ORT runs as nchwc.Conv
    plain: int  # convolutions it leaves in the plain layout
    reorders: int  # layout conversions between the two
    plain_channels: list[list[int]] = field(default_factory=list)  # [out, in] of each plain convolution

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        total = self.blocked + self.plain
        if not total:
            return "no float convolutions"
        text = f"{self.blocked} of {total} convolutions in ONNX Runtime's blocked CPU layout (NCHWc)"
        if self.plain:
            shapes = ", ".join(sorted({f"{o}x{i}" for o, i in self.plain_channels}))
            text += (
                f"; {self.plain} plain (out x in channels {shapes}: input channels not a multiple of 4), "
                f"{self.reorders} layout reorders"
            )
        return text


def cpu_conv_layout(model: ModelProto | str | os.PathLike) -> ConvLayout:
    """Optimize `model` as the CPU provider does at ORT_ENABLE_ALL and count its convolutions by layout."""
    optimized = ort_optimized(model, all_optimizations=True)
    graph = optimized.graph
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    blocked = plain = reorders = 0
    channels: list[list[int]] = []
    for node in graph.node:
        if node.domain == NCHWC_DOMAIN:
            blocked += node.op_type == "Conv"
            reorders += node.op_type.startswith("Reorder")
        elif node.op_type in PLAIN_CONVS and node.domain in ("", "com.microsoft"):
            plain += 1
            w = shapes.get(node.input[1]) if len(node.input) > 1 else None
            if w is not None and len(w) == 4:
                groups = next((a.i for a in node.attribute if a.name == "group"), 1)
                channels.append([int(w[0]), int(w[1] * groups)])
    return ConvLayout(blocked, plain, reorders, channels)
