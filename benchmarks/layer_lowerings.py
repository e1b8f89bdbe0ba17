"""Single-layer lowering experiments for channel NENNI in ONNX Runtime (issue 4), outside the exporter.

Each variant is one hand-built ONNX graph of one 3x3 convolution layer at ratio 0.25 (k = n/8), timed
interleaved against the dense convolution with the same shapes: the projection and approximator alone
("predonly"), Gather im2col with precomputed indices, Slice im2col, the channel-score shortcut, a grouped
convolution with one group per sample (needs a static batch), and a fused variant (scores from window means,
projection filters inside the grouped convolution). Usage: python benchmarks/layer_lowerings.py [CxH,...]
"""

# ruff: noqa
import sys, time, numpy as np, onnx, onnxruntime as ort
from onnx import helper as h, TensorProto as T, numpy_helper as nh


def model(nodes, inits, B, C, H, out="Y"):
    g = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info("X", T.FLOAT, [B, C, H, H])],
        [h.make_tensor_value_info(out, T.FLOAT, None)],
        [nh.from_array(v, k) for k, v in inits.items()],
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 18)])
    m.ir_version = 9
    return m


def scatter_into_prediction(c, B, K, L, n, H):
    """Static-batch tail: the K exact rows `ex` (B, K, L) overwrite the prediction `pf` (B, n, L) at `idx`."""
    return [
        h.make_node("Unsqueeze", ["idx", "ax2"], ["idx2"]),
        c("ax2", np.array([2], np.int64)),
        h.make_node("Expand", ["idx2", "exs"], ["idxe"]),
        c("exs", np.array([B, K, L], np.int64)),
        h.make_node("ScatterElements", ["pf", "idxe", "ex"], ["yf"], axis=1),
        h.make_node("Reshape", ["yf", "ys"], ["Y"]),
        c("ys", np.array([B, n, H, H], np.int64)),
    ]


def build(variant, B, C, H, ratio, kproj):
    rng = np.random.default_rng(0)
    n = C
    K = max(1, int(round(ratio * n)))
    d = C * 9
    L = H * H
    W = rng.standard_normal((n, C, 3, 3)).astype(np.float32)
    Bi = rng.standard_normal(n).astype(np.float32)
    P = rng.choice([-1, 0, 1], size=(kproj, C, 3, 3)).astype(np.float32)
    Wa = rng.standard_normal((n, kproj, 1, 1)).astype(np.float32)
    Ba = rng.standard_normal(n).astype(np.float32)
    c = lambda name, v: h.make_node("Constant", [], [name], value=nh.from_array(np.asarray(v), name))
    inits = dict(W=W, Bi=Bi)
    if variant == "dense":
        return model([h.make_node("Conv", ["X", "W", "Bi"], ["Y"], pads=[1, 1, 1, 1])], inits, B, C, H)
    inits.update(P=P, Wa=Wa, Ba=Ba, k=np.array([K], np.int64))
    nodes = [
        h.make_node("Conv", ["X", "P"], ["u"], pads=[1, 1, 1, 1]),
        h.make_node("Conv", ["u", "Wa", "Ba"], ["pred"]),
    ]
    if variant.startswith("score"):
        # channel score from the mean projection: linearity of the approximator
        inits["Wa2"] = Wa[:, :, 0, 0].T.copy()
        nodes += [
            h.make_node("ReduceMean", ["u", "rax"], ["um"], keepdims=0),
            c("rax", np.array([2, 3], np.int64)),
            h.make_node("Gemm", ["um", "Wa2", "Ba"], ["cs"]),
        ]
    else:
        nodes += [h.make_node("ReduceMean", ["pred", "rax"], ["cs"], keepdims=0), c("rax", np.array([2, 3], np.int64))]
    nodes += [
        h.make_node("TopK", ["cs", "k"], ["tv", "top"], axis=1),
        h.make_node("TopK", ["top", "k"], ["iv", "idx"], axis=1, largest=0),
    ]  # idx (B,K) of values ascending -> use iv
    nodes[-1] = h.make_node("TopK", ["top", "k"], ["idx", "_"], axis=1, largest=0)
    body = variant.split("+")[-1]
    if body in ("im2col_static", "im2col_slice"):
        inits["W2"] = W.reshape(n, -1)
        inits["B2"] = Bi
        if body == "im2col_static":
            hp = H + 2
            ky, kx, oy, ox = np.meshgrid(np.arange(3), np.arange(3), np.arange(H), np.arange(H), indexing="ij")
            inits["fidx"] = ((oy + ky) * hp + (ox + kx)).reshape(9, L).astype(np.int64)
            nodes += [
                h.make_node("Pad", ["X", "pads"], ["xp"]),
                c("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)),
                h.make_node("Reshape", ["xp", "s1"], ["xf"]),
                c("s1", np.array([0, 0, -1], np.int64)),
                h.make_node("Gather", ["xf", "fidx"], ["pt"], axis=2),
                h.make_node("Reshape", ["pt", "s2"], ["cols"]),
                c("s2", np.array([0, d, L], np.int64)),
            ]
        else:
            nodes += [
                h.make_node("Pad", ["X", "pads"], ["xp"]),
                c("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)),
            ]
            sl = []
            for ky in range(3):
                for kx in range(3):
                    nm = f"s{ky}{kx}"
                    nodes += [
                        h.make_node("Slice", ["xp", f"st{nm}", f"en{nm}", "ax"], [nm]),
                        c(f"st{nm}", np.array([ky, kx], np.int64)),
                        c(f"en{nm}", np.array([ky + H, kx + H], np.int64)),
                        h.make_node("Unsqueeze", [nm, "ax2"], [nm + "u"]),
                    ]
                    sl.append(nm + "u")
            nodes += [
                c("ax", np.array([2, 3], np.int64)),
                c("ax2", np.array([2], np.int64)),
                h.make_node("Concat", sl, ["cat"], axis=2),  # (B, C, 9, H, W)
                h.make_node("Reshape", ["cat", "s2"], ["cols"]),
                c("s2", np.array([0, d, L], np.int64)),
            ]
        nodes += [
            h.make_node("Gather", ["W2", "idx"], ["rows"], axis=0),  # (B,K,d)
            h.make_node("MatMul", ["rows", "cols"], ["ex0"]),
            h.make_node("Gather", ["B2", "idx"], ["bs"], axis=0),
            h.make_node("Unsqueeze", ["bs", "ax2"], ["bs2"]),
            h.make_node("Add", ["ex0", "bs2"], ["ex"]),
            h.make_node("Reshape", ["pred", "s1"], ["pf"]),
            h.make_node("Unsqueeze", ["idx", "ax2"], ["idx2"]),
            h.make_node("Shape", ["ex"], ["exs"]),
            h.make_node("Expand", ["idx2", "exs"], ["idxe"]),
            h.make_node("ScatterElements", ["pf", "idxe", "ex"], ["yf"], axis=1),
            h.make_node("Shape", ["pred"], ["ps"]),
            h.make_node("Reshape", ["yf", "ps"], ["Y"]),
        ]
        if "ax2" not in [x for nd in nodes for x in nd.output]:
            nodes.append(c("ax2", np.array([2], np.int64)))
        if "s1" not in [x for nd in nodes for x in nd.output]:
            nodes.append(c("s1", np.array([0, 0, -1], np.int64)))
    elif body == "grouped":
        # static batch: one group per sample
        nodes += [
            h.make_node("Gather", ["W", "idx"], ["wsel"], axis=0),  # (B,K,C,3,3)
            h.make_node("Reshape", ["wsel", "ws"], ["wg"]),
            c("ws", np.array([B * K, C, 3, 3], np.int64)),
            h.make_node("Gather", ["Bi", "idx"], ["bsel"], axis=0),
            h.make_node("Reshape", ["bsel", "bs"], ["bg"]),
            c("bs", np.array([B * K], np.int64)),
            h.make_node("Reshape", ["X", "xs"], ["xg"]),
            c("xs", np.array([1, B * C, H, H], np.int64)),
            h.make_node("Conv", ["xg", "wg", "bg"], ["eg"], pads=[1, 1, 1, 1], group=B),
            h.make_node("Reshape", ["eg", "es"], ["ex"]),
            c("es", np.array([B, K, L], np.int64)),
            h.make_node("Reshape", ["pred", "s1"], ["pf"]),
            c("s1", np.array([0, 0, -1], np.int64)),
            *scatter_into_prediction(c, B, K, L, n, H),
        ]
    elif body == "fused":
        # static batch: scores from AveragePool window means (no full-res projection before selection);
        # one grouped conv computes the K essential filters and the k projection filters together.
        nodes = []  # replaces the generic prediction
        inits["Wa2"] = Wa[:, :, 0, 0].copy()  # (n, k)
        nodes += [
            h.make_node("Pad", ["X", "pads"], ["xp"]),
            c("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)),
            h.make_node("AveragePool", ["xp"], ["S"], kernel_shape=[H, H]),  # (B,C,3,3)
            h.make_node("Conv", ["S", "P"], ["um4"]),  # (B,k,1,1)
            h.make_node("Flatten", ["um4"], ["um"]),
            h.make_node("Gemm", ["um", "Wa2", "Ba"], ["cs"], transB=1),
            h.make_node("TopK", ["cs", "k"], ["tv", "top"], axis=1),
            h.make_node("TopK", ["top", "k"], ["idx", "_"], axis=1, largest=0),
            h.make_node("Gather", ["W", "idx"], ["wsel"], axis=0),  # (B,K,C,3,3)
            h.make_node("Expand", ["P5", "pe"], ["pb"]),
            c("pe", np.array([B, kproj, C, 3, 3], np.int64)),
            h.make_node("Concat", ["wsel", "pb"], ["wall"], axis=1),  # (B,K+k,C,3,3)
            h.make_node("Reshape", ["wall", "ws"], ["wg"]),
            c("ws", np.array([B * (K + kproj), C, 3, 3], np.int64)),
            h.make_node("Gather", ["Bi", "idx"], ["bsel"], axis=0),
            h.make_node("Concat", ["bsel", "zb"], ["ball"], axis=1),
            c("zb", np.zeros((B, kproj), np.float32)),
            h.make_node("Reshape", ["ball", "bs"], ["bg"]),
            c("bs", np.array([B * (K + kproj)], np.int64)),
            h.make_node("Reshape", ["X", "xs"], ["xg"]),
            c("xs", np.array([1, B * C, H, H], np.int64)),
            h.make_node("Conv", ["xg", "wg", "bg"], ["eg"], pads=[1, 1, 1, 1], group=B),
            h.make_node("Reshape", ["eg", "es"], ["eu"]),
            c("es", np.array([B, K + kproj, L], np.int64)),
            h.make_node("Split", ["eu", "sp"], ["ex", "u"], axis=1),
            c("sp", np.array([K, kproj], np.int64)),
            h.make_node("MatMul", ["Wa2", "u"], ["pm"]),  # (B,n,L)
            h.make_node("Add", ["pm", "Ba3"], ["pf"]),
            c("Ba3", Ba[:, None]),
            *scatter_into_prediction(c, B, K, L, n, H),
        ]
        inits["P5"] = P[None]
    elif body == "predonly":
        nodes += [h.make_node("Identity", ["pred"], ["Y"])]
    return model(nodes, inits, B, C, H)


def sess(m, threads=2):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def bench(variants, B, C, H, ratio, kproj, rounds=15, inner=None):
    x = np.random.default_rng(1).random((B, C, H, H), dtype=np.float32)
    ss = {v: sess(build(v, B, C, H, ratio, kproj)) for v in variants}
    for s in ss.values():
        for _ in range(5):
            s.run(None, {"X": x})
    t = {v: [] for v in variants}
    inner = inner or max(1, int(2000 / (B * C * H * H / 1024)))
    for _ in range(rounds):
        for v, s in ss.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                s.run(None, {"X": x})
            t[v].append((time.perf_counter() - t0) / inner)
    return {v: float(np.median(ts)) for v, ts in t.items()}


if __name__ == "__main__":
    vs = ["dense", "predonly", "im2col_static", "im2col_slice", "score+im2col_static", "grouped", "fused"]
    shapes = (
        [tuple(map(int, a.split("x"))) for a in sys.argv[1].split(",")]
        if len(sys.argv) > 1
        else [(16, 32), (32, 16), (64, 8)]
    )
    for B in (1, 64):
        for C, H in shapes:
            for ratio in (0.25,):
                r = bench(vs, B, C, H, ratio, max(2, C // 8))
                d = r["dense"]
                print(
                    f"B={B} C={C} H={H} r={ratio}: "
                    + "  ".join(f"{v}={r[v] * 1e6:.0f}us({d / r[v]:.2f}x)" for v in vs),
                    flush=True,
                )
