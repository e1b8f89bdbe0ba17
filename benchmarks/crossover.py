"""Where skipping pays (issue 15): single 3x3 channel NENNI layers against the dense convolution in ONNX Runtime.

For every layer shape (C_in, C_out, H = W, stride 1), batch size and precision (float32, int8), the variants
are timed interleaved in one loop, 2 threads by default:
- dense:   the plain convolution (float32 Conv; int8: the QDQ group ORT fuses into QLinearConv);
- masked:  the NENNI layer's masked body (prediction, selection, the dense convolution, select);
- skip:    the NENNI layer's skipping body (shared patches, the K selected filters per sample, fill), per ratio;
- grouped: the static-batch body (`nenni export --batch N --channel-lowering grouped`): one convolution group
  per sample over the gathered filters (float32 Conv, int8 ConvInteger).
The NENNI bodies are the exporter's own (exporters.ops / ops_int8); k = C_out / 8 (at least 2).

Writes ROWS (one JSON line per measurement; a rerun skips what is there), fits the decision model that
`--channel-lowering auto` uses (exporters/lowering_model.py) and plots the crossover:

  python benchmarks/crossover.py --out runs/crossover \\
      --model-out nenni_deploy/exporters/lowering_model.json --plot docs/figures/crossover.png

Time nothing else while it runs (the idle-machine run takes about an hour on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from nenni_deploy.exporters import ops
from nenni_deploy.exporters.int8 import cpu_has_vnni
from nenni_deploy.exporters.lowering_model import fit_lowering_model
from nenni_deploy.nenni.projection import ternary_projection
from nenni_deploy.nenni.quant import fake_quantize

# (C_in, C_out, H): the CIFAR ResNets, PreAct ResNet-18 and WRN-34-10 layers, and some in between.
SHAPES = [
    (16, 16, 32), (32, 32, 16), (64, 64, 8),  # ResNet-20/56
    (32, 32, 32), (64, 64, 16), (128, 128, 8),
    (64, 64, 32), (128, 128, 16), (256, 256, 8), (512, 512, 4),  # PreAct ResNet-18
    (160, 160, 32), (320, 320, 16), (640, 640, 8),  # WRN-34-10
]  # fmt: skip
OPSET = 18


# -- single-layer graphs ----------------------------------------------------------------------------------------
def _model(nodes, inits, x_shape, functions=()) -> onnx.ModelProto:
    g = helper.make_graph(
        nodes,
        "layer",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(ops.DOMAIN, ops.DOMAIN_VERSION)]
    m = helper.make_model(g, opset_imports=opsets, ir_version=10)
    m.functions.extend(functions)
    return m


class Layer:
    """Random weights for one 3x3 layer and its NENNI parts; calibrated int8 parameters from a sample."""

    def __init__(self, cin: int, cout: int, h: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.cin, self.cout, self.h = cin, cout, h
        self.k = max(2, cout // 8)
        self.w = (rng.standard_normal((cout, cin, 3, 3)) * math.sqrt(2 / (9 * cin))).astype(np.float32)
        self.b = (rng.standard_normal(cout) * 0.1).astype(np.float32)
        self.p = ternary_projection((self.k, cin, 3, 3), seed).numpy()
        wa = torch.from_numpy((rng.standard_normal((cout, self.k)) * 0.1).astype(np.float32))
        self.wa = fake_quantize(wa, 8).detach().numpy()
        self.ba = (rng.standard_normal(cout) * 0.1).astype(np.float32)
        sample = torch.rand(4, cin, h, h, generator=torch.Generator().manual_seed(seed))
        u = F.conv2d(sample, torch.from_numpy(self.p), None, 1, 1)
        y = F.conv2d(sample, torch.from_numpy(self.w), torch.from_numpy(self.b), 1, 1)
        self.quant = {
            "x_scale": 1 / 255,
            "x_zero_point": 0,
            **_uint8("u", float(u.min()), float(u.max())),
            **_uint8("y", float(y.min()), float(y.max())),
            "w_bits": 8,
            "approx_bits": 8,
        }

    @property
    def work(self) -> int:
        return self.cin * self.cout * self.h * self.h

    def nenni(self, batch: int, ratio: float, lowering: str, int8: bool, reduce_range: bool) -> onnx.ModelProto:
        K = max(1, round(ratio * self.cout))
        attrs = ops.layer_attributes(
            granularity="channel", rank="signed", k=K, ratio=ratio, nm=[4, 8], threshold=0.0,
            strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1],
        )  # fmt: skip
        if int8:
            attrs.update(self.quant)
            if lowering == "masked" and reduce_range:  # u8 x s8 kernels (QLinearConv)
                attrs["w_bits"] = 7
        if lowering == "grouped":
            attrs["batch"] = batch  # the graph's static batch: one convolution group per sample
        node = helper.make_node("NenniConv", ["X", "W", "B", "P", "Wa", "Ba"], ["Y", ""], domain=ops.DOMAIN, **attrs)
        node.overload = ops.overload_name("channel", "signed", (3, 3), lowering, int8=int8)
        inits = {"W": self.w, "B": self.b, "P": self.p, "Wa": self.wa, "Ba": self.ba}
        return _model([node], inits, (batch, self.cin, self.h, self.h), [ops.function_for_node(node, OPSET)])

    def dense(self, batch: int, int8: bool, reduce_range: bool) -> onnx.ModelProto:
        shape = (batch, self.cin, self.h, self.h)
        if not int8:
            return _model([helper.make_node("Conv", ["X", "W", "B"], ["Y"], pads=[1, 1, 1, 1])],
                          {"W": self.w, "B": self.b}, shape)  # fmt: skip
        qmax = 63 if reduce_range else 127
        ws = np.abs(self.w).reshape(self.cout, -1).max(1) / qmax
        wq = np.round(self.w / ws[:, None, None, None]).astype(np.int8)
        xs, q = np.float32(self.quant["x_scale"]), self.quant
        nodes = [
            helper.make_node("QuantizeLinear", ["X", "xs", "xz"], ["xq"]),
            helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
            helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
            helper.make_node("DequantizeLinear", ["bq", "bs"], ["bd"], axis=0),
            helper.make_node("Conv", ["xd", "wd", "bd"], ["y"], pads=[1, 1, 1, 1]),
            helper.make_node("QuantizeLinear", ["y", "ys", "yz"], ["yq"]),
            helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["Y"]),
        ]
        inits = {
            "xs": xs, "xz": np.uint8(0), "wq": wq, "ws": ws.astype(np.float32), "wz": np.zeros(self.cout, np.int8),
            "bq": np.round(self.b / (ws * xs)).astype(np.int32), "bs": (ws * xs).astype(np.float32),
            "ys": np.float32(q["y_scale"]), "yz": np.uint8(q["y_zero_point"]),
        }  # fmt: skip
        return _model(nodes, inits, shape)


def _uint8(prefix: str, lo: float, hi: float) -> dict:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255 or 1.0
    return {f"{prefix}_scale": scale, f"{prefix}_zero_point": int(round(-lo / scale))}


# -- timing -----------------------------------------------------------------------------------------------------
def session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def time_interleaved(sessions: dict, x: np.ndarray, seconds: float, rounds: int) -> dict[str, tuple[float, float]]:
    """(median, minimum) per-run latency (ms) of each session; rounds alternate the sessions, >= 2 runs each per
    round. The minimum is what the decision model fits: on a machine other processes keep busy it stays close
    to the layer's own cost, where the median follows the load."""
    for s in sessions.values():
        s.run(None, {"X": x})
    samples = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            end, n = time.perf_counter() + seconds / rounds, 0
            while n < 2 or time.perf_counter() < end:
                t0 = time.perf_counter()
                s.run(None, {"X": x})
                samples[k].append(time.perf_counter() - t0)
                n += 1
    return {k: (float(np.median(v)) * 1e3, float(np.min(v)) * 1e3) for k, v in samples.items()}


def other_load(seconds: float) -> float | None:
    """Cores other processes kept busy over the last `seconds` (from /proc/stat), for the record."""
    try:
        a = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        time.sleep(seconds)
        b = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except OSError:
        return None
    busy = (sum(b[:8]) - b[3] - b[4]) - (sum(a[:8]) - a[3] - a[4])
    return busy / os.sysconf("SC_CLK_TCK") / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/crossover"))
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--ratios", default="0.25,0.5,0.75")
    ap.add_argument("--precisions", default="float32,int8")
    ap.add_argument("--shapes", default="", help="CIN:COUT:H,... (default: the built-in grid)")
    ap.add_argument("--variants", default="dense,masked,skip,grouped")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=1.0, help="timed seconds per variant and layer")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reduce-range", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--model-out", type=Path, default=None, help="write the fitted lowering model here")
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows_path = args.out / "rows.jsonl"
    done = {}
    if rows_path.exists():
        for line in rows_path.read_text().splitlines():
            r = json.loads(line)
            done[_key(r)] = r
    shapes = [tuple(int(v) for v in s.split(":")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    ratios = [float(r) for r in args.ratios.split(",")]
    variants = args.variants.split(",")
    reduce_range = {"auto": not cpu_has_vnni(), "on": True, "off": False}[args.reduce_range]
    for precision in args.precisions.split(","):
        int8 = precision == "int8"
        for batch in (int(b) for b in args.batches.split(",")):
            for cin, cout, h in shapes:
                base = {"precision": precision, "batch": batch, "cin": cin, "cout": cout, "h": h}
                wanted = [(v, r) for v in variants for r in (ratios if v in ("skip", "grouped") else [None])]
                todo = [(v, r) for v, r in wanted if _key({**base, "variant": v, "ratio": r}) not in done]
                if not todo:
                    continue
                layer = Layer(cin, cout, h)
                models = {}
                for v, r in wanted:  # every variant of the layer in one interleaved loop
                    if v == "dense":
                        models[(v, r)] = layer.dense(batch, int8, reduce_range)
                    elif v == "masked":
                        models[(v, r)] = layer.nenni(batch, 0.5, "masked", int8, reduce_range)
                    elif v == "skip":
                        models[(v, r)] = layer.nenni(batch, r, "skip", int8, reduce_range)
                    elif v == "grouped":
                        models[(v, r)] = layer.nenni(batch, r, "grouped", int8, reduce_range)
                sessions = {k: session(m, args.threads) for k, m in models.items()}
                x = np.random.default_rng(1).random((batch, cin, h, h), dtype=np.float32)
                load = other_load(0.2)
                ms = time_interleaved(sessions, x, args.seconds * len(sessions), args.rounds)
                with rows_path.open("a") as f:
                    for (v, r), (median, fastest) in ms.items():
                        row = {**base, "variant": v, "ratio": r, "ms": fastest, "median_ms": median,
                               "work": layer.work, "k": layer.k, "other_load": load}  # fmt: skip
                        done[_key(row)] = row
                        f.write(json.dumps(row) + "\n")
                line = "  ".join(f"{v}{'' if r is None else f'@{r:g}'} {t[1]:.2f}" for (v, r), t in ms.items())
                print(f"{precision} b{batch} {cin}->{cout} {h}x{h}: {line} ms (fastest run; load {load})", flush=True)
    rows = list(done.values())
    decision_rows = _decision_rows(rows)
    print(table(rows))
    if args.model_out:
        measured = {
            "cpu": cpu_model(),
            "cpu_vnni": cpu_has_vnni(),
            "threads": args.threads,
            "onnxruntime": ort.__version__,
            "date": time.strftime("%Y-%m-%d"),
            "rows": len(decision_rows),
            "max_other_load_cores": max((r.get("other_load") or 0.0) for r in rows) if rows else None,
            "command": "python benchmarks/crossover.py",
        }
        model = fit_lowering_model(decision_rows, measured)
        model.save(args.model_out)
        print(f"wrote {args.model_out}")
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {args.plot}")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _key(r: dict) -> tuple:
    return (r["precision"], r["batch"], r["cin"], r["cout"], r["h"], r["variant"], r["ratio"])


def _decision_rows(rows: list[dict]) -> list[dict]:
    """Every skip and grouped measurement beside the masked body's time on the same layer."""
    masked = {}
    for r in rows:
        if r["variant"] == "masked":
            masked[(r["precision"], r["batch"], r["cin"], r["cout"], r["h"])] = r["ms"]
    out = []
    for r in rows:
        key = (r["precision"], r["batch"], r["cin"], r["cout"], r["h"])
        if r["variant"] in ("skip", "grouped") and key in masked:
            out.append({**r, "positions": r["h"] * r["h"], "masked_ms": masked[key]})
    return out


def table(rows: list[dict]) -> str:
    """Markdown: per precision, batch and shape, each variant's speed over the dense convolution."""
    by = {}
    for r in rows:
        by.setdefault((r["precision"], r["batch"], r["cin"], r["cout"], r["h"]), {})[(r["variant"], r["ratio"])] = r[
            "ms"
        ]
    cols = sorted({k for d in by.values() for k in d if k[0] != "dense"}, key=lambda k: (k[0], k[1] or 0))
    head = ["precision", "batch", "layer", "dense ms"] + [f"{v}{'' if r is None else f' {r:g}'}" for v, r in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (p, b, ci, co, h), d in sorted(by.items()):
        dense = d.get(("dense", None))
        cells = [p, str(b), f"{ci}->{co} {h}x{h}", f"{dense:.3f}" if dense else "-"]
        cells += [f"{dense / d[c]:.2f}x" if dense and c in d else "-" for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], out: Path) -> None:
    """Speed over the dense convolution against the layer width, one panel per precision and batch size, one
    marker per spatial size; masked, and skip and grouped at the lowest and middle ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    precisions = sorted({r["precision"] for r in rows})
    batches = sorted({r["batch"] for r in rows})
    ratios = sorted({r["ratio"] for r in rows if r["ratio"] is not None})[:2]
    shown = [("masked", None)] + [(v, q) for v in ("skip", "grouped") for q in ratios]
    fig, axes = plt.subplots(len(precisions), len(batches), figsize=(5.5 * len(batches), 4 * len(precisions)),
                             squeeze=False)  # fmt: skip
    dense = {}
    for r in rows:
        if r["variant"] == "dense":
            dense[(r["precision"], r["batch"], r["cin"], r["cout"], r["h"])] = r["ms"]
    markers = dict(zip(sorted({r["h"] for r in rows}), "os^vDp", strict=False))
    for i, p in enumerate(precisions):
        for j, b in enumerate(batches):
            ax = axes[i][j]
            for n, (v, ratio) in enumerate(shown):
                pts = sorted(
                    (math.sqrt(r["cin"] * r["cout"]), dense[(p, b, r["cin"], r["cout"], r["h"])] / r["ms"], r["h"])
                    for r in rows
                    if r["precision"] == p
                    and r["batch"] == b
                    and r["variant"] == v
                    and r["ratio"] == ratio
                    and (p, b, r["cin"], r["cout"], r["h"]) in dense
                )
                label = v if ratio is None else f"{v}, ratio {ratio:g}"
                style = {"masked": "--", "skip": "-", "grouped": ":"}[v]
                ax.plot([q[0] for q in pts], [q[1] for q in pts], style, color=f"C{n}", linewidth=0.8, label=label)
                for x, y, h in pts:
                    ax.plot([x], [y], markers[h], color=f"C{n}", markersize=3)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("layer width sqrt(C_in C_out); marker = spatial size " +
                          " ".join(f"{m}:{h}" for h, m in markers.items()))  # fmt: skip
            ax.set_ylabel("speed over the dense convolution")
            ax.set_title(f"{p}, batch {b}")
            ax.legend(fontsize=6)
    fig.suptitle("3x3 channel NENNI layers in ONNX Runtime, 2 threads (above 1: faster than dense)", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
