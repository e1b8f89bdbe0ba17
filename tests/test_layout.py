"""The CPU layout report: which convolutions ONNX Runtime runs in its blocked NCHWc layout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nenni_deploy.cli.bench import summary_text
from nenni_deploy.evaluation.bench import BenchSettings, run_bench
from nenni_deploy.runtime.layout import ConvLayout, cpu_conv_layout


def _export(path, widths):
    layers = []
    for cin, cout in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], 10)).eval()
    torch.onnx.export(net, torch.rand(1, 3, 16, 16), path, input_names=["x"], dynamic_axes={"x": {0: "n"}},
                      dynamo=False)  # fmt: skip
    return path


def test_a_convolution_reading_a_partial_channel_block_stays_plain(tmp_path):
    # 22 input channels are not a multiple of 4 and more than one block, on AVX2 and AVX-512 alike
    odd = cpu_conv_layout(_export(tmp_path / "odd.onnx", [3, 32, 22, 32]))
    even = cpu_conv_layout(_export(tmp_path / "even.onnx", [3, 32, 32, 32]))
    assert (even.blocked, even.plain) == (3, 0)
    assert (odd.blocked, odd.plain) == (2, 1) and odd.plain_channels == [[32, 22]] and odd.reorders > 0
    assert "32x22" in odd.describe() and "3 of 3" in even.describe()
    assert ConvLayout(0, 0, 0).describe() == "no float convolutions"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bench_reports_the_layout_when_a_convolution_is_plain(tmp_path):
    odd = _export(tmp_path / "odd.onnx", [3, 32, 22, 32])
    even = _export(tmp_path / "even.onnx", [3, 32, 32, 32])
    settings = BenchSettings(batches=(1,), threads=1, warmup=0, duration=None, iterations=3, rounds=2)
    report = run_bench([odd, even], None, settings, progress=False)
    assert report["layout"]["odd"]["plain"] == 1 and report["layout"]["even"]["plain"] == 0
    text = summary_text(report)
    assert "layout odd: 2 of 3 convolutions" in text and "layout even: 3 of 3" in text
