"""Outlier channels kept out of int8: LLM.int8()'s decomposition, with the channels chosen once on calibration data.

Trained transformers carry a few activation channels far larger than the rest (all-MiniLM-L6-v2: channel 99 of
the LayerNorm output that feeds each FFN reaches 28 where the median channel reaches 1.9). ONNX Runtime's dynamic
int8 quantizes each activation with one scale per tensor, so those channels set the step for all of them, and
the weight rows they multiply carry their error 15 times amplified. For every weighted MatMul `Y = X W` whose
input has such channels S (calibration range above `RATIO` times the median channel's, at most `limit`):

    Y = (X * mask) W'  +  Gather(X, S) W[S]

with `mask` zero on S and `W'` = W with the rows S zeroed. The first MatMul keeps the node's name and is
quantized as before, now on a range without the outliers; the second (K = |S|, a few columns) stays fp32. In
fp32 the two are the same graph, so verification and the fallback compare it with the parent unchanged.
Measured on all-MiniLM-L6-v2 (88 built-in sentences, 7-bit weights): cosine min 0.9575 -> 0.9859 with S of at
most 4 channels, for about 5 % more time per batch (README).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: a channel is an outlier when its calibration range is this many times the median channel's
RATIO = 3.0
#: channels split out of each MatMul at most (each costs an fp32 column of the layer's work)
LIMIT = 4
#: suffix of the fp32 MatMul that computes the outlier channels (quantizers must leave it alone)
OUTLIER_SUFFIX = "/outlier_channels"


@dataclass
class Split:
    """What the split did to one graph."""

    #: {MatMul node: [outlier channels]}
    channels: dict[str, list[int]] = field(default_factory=dict)
    #: the fp32 MatMuls it added (to exclude from quantization)
    fp32_nodes: list[str] = field(default_factory=list)

    def to_json(self, ratio: float, limit: int, data: str) -> dict[str, Any]:
        return {
            "rule": f"input channels whose calibration range exceeds {ratio:g}x the median channel's, at most {limit} per MatMul, stay fp32",
            "data": data,
            "matmuls": len(self.channels),
            "channels": sum(len(c) for c in self.channels.values()),
            "per_matmul": self.channels,
        }


def weighted_matmuls(model: Any) -> list[Any]:
    """MatMul nodes whose second input is a constant (the layers a quantizer makes int8)."""
    initializers = {t.name for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in initializers]


def channel_ranges(model: Any, feeds: list[dict[str, np.ndarray]], threads: int | None = None) -> dict[str, np.ndarray]:
    """{input tensor of a weighted MatMul: absolute maximum of each of its channels (last axis) over `feeds`}."""
    import copy

    import onnx

    probe = copy.deepcopy(model)
    wanted = sorted({n.input[0] for n in weighted_matmuls(model)})
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in wanted if t not in present)
    with _session(probe, threads) as sess:
        names = {i.name for i in sess.get_inputs()}
        ranges: dict[str, np.ndarray] = {}
        for feed in feeds:
            for tensor, value in zip(wanted, sess.run(wanted, {k: v for k, v in feed.items() if k in names}), strict=True):
                channel_max = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
                ranges[tensor] = np.maximum(ranges[tensor], channel_max) if tensor in ranges else channel_max
    return ranges


@contextlib.contextmanager
def _session(model: Any, threads: int | None) -> Iterator[Any]:
    """A session of an in-memory graph; one over protobuf's 2 GB (a 3B decoder) goes through a temporary file."""
    from vlmopt import graph
    from vlmopt.quantization.fallback import session
    from vlmopt.runners.generate import ort_session

    if graph.byte_size(model) <= graph.EXTERNAL_DATA_BYTES:
        yield session(model, threads)
        return
    with tempfile.TemporaryDirectory(prefix="vlmopt-outliers-") as folder:
        path = Path(folder) / "probe.onnx"
        graph.save(model, path)
        yield ort_session(path, threads)


def outlier_channels(channel_max: np.ndarray, ratio: float = RATIO, limit: int = LIMIT) -> list[int]:
    """The channels whose range exceeds `ratio` times the median channel's, largest first, at most `limit`."""
    median = float(np.median(channel_max))
    order = np.argsort(channel_max)[::-1][:limit]
    return sorted(int(c) for c in order if channel_max[c] > ratio * median > 0)


def split(model: Any, ranges: dict[str, np.ndarray], ratio: float = RATIO, limit: int = LIMIT, nodes: set[str] | None = None) -> Split:
    """Rewrite `model` in place: each weighted MatMul (of `nodes`, when given) with outlier input channels becomes an
    int8-ready MatMul on the other channels plus an fp32 MatMul on the outliers (the module docstring)."""
    from onnx import helper, numpy_helper

    initializers = {t.name: t for t in model.graph.initializer}
    targets = {n.name for n in weighted_matmuls(model) if nodes is None or n.name in nodes}
    done = Split()
    nodes, added = [], []
    for node in model.graph.node:
        x = node.input[0] if node.input else ""
        channels = outlier_channels(ranges[x], ratio, limit) if node.name in targets and x in ranges else []
        weight = numpy_helper.to_array(initializers[node.input[1]]) if channels else None
        if not channels or weight is None or weight.ndim != 2:
            nodes.append(node)
            continue
        name, w = node.name, node.input[1]
        mask = np.ones(weight.shape[0], dtype=weight.dtype)
        mask[channels] = 0
        added += [
            numpy_helper.from_array(mask, f"{name}/inlier_mask"),
            numpy_helper.from_array(np.array(channels, dtype=np.int64), f"{name}/outlier_index"),
            numpy_helper.from_array(weight * mask[:, None], f"{w}/inliers"),
            numpy_helper.from_array(np.ascontiguousarray(weight[channels]), f"{w}/outliers"),
        ]
        nodes += [
            helper.make_node("Mul", [x, f"{name}/inlier_mask"], [f"{name}/inliers"], name=f"{name}/inlier_mask"),
            helper.make_node("MatMul", [f"{name}/inliers", f"{w}/inliers"], [f"{name}/inlier_output"], name=name),
            helper.make_node("Gather", [x, f"{name}/outlier_index"], [f"{name}/outliers"], name=f"{name}/outlier_gather", axis=-1),
            helper.make_node("MatMul", [f"{name}/outliers", f"{w}/outliers"], [f"{name}/outlier_output"], name=name + OUTLIER_SUFFIX),
            helper.make_node("Add", [f"{name}/inlier_output", f"{name}/outlier_output"], list(node.output), name=f"{name}/outlier_sum"),
        ]
        done.channels[name] = channels
        done.fp32_nodes.append(name + OUTLIER_SUFFIX)
    if done.channels:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        model.graph.initializer.extend(added)
        used = {i for n in model.graph.node for i in n.input}
        kept = [t for t in model.graph.initializer if t.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
    return done
