"""Outlier channels kept out of int8 (`vlmopt.quantization.outliers`): exact in fp32, and what it buys in int8."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from vlmopt.quantization import outliers

K, N = 64, 32


def _matmul_graph(weight: np.ndarray) -> onnx.ModelProto:
    """Y = X W, the shape of a transformer's projection (batch, tokens, K)."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="/proj/MatMul")],
        "proj",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "tokens", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "tokens", N])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _activations(seed: int, outlier_scale: float = 40.0) -> np.ndarray:
    """Activations whose channels 3 and 17 are `outlier_scale` times the others (as a trained LayerNorm's output)."""
    x = np.random.default_rng(seed).standard_normal((4, 16, K)).astype(np.float32)
    x[..., [3, 17]] *= outlier_scale
    return x


def _run(model: onnx.ModelProto | str, x: np.ndarray) -> np.ndarray:
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _weight() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((K, N)).astype(np.float32) / 8


def test_outlier_channels_are_those_above_ratio_times_the_median_largest_first_at_most_limit() -> None:
    channel_max = np.ones(16)
    channel_max[[2, 5, 9]] = [10.0, 30.0, 20.0]

    assert outliers.outlier_channels(channel_max, ratio=3.0, limit=2) == [5, 9]
    assert outliers.outlier_channels(channel_max, ratio=3.0, limit=8) == [2, 5, 9]
    assert outliers.outlier_channels(channel_max, ratio=40.0, limit=8) == []


def test_channel_ranges_are_the_per_channel_maximum_of_each_weighted_matmul_input() -> None:
    x = _activations(0)
    model = _matmul_graph(_weight())

    ranges = outliers.channel_ranges(model, [{"x": x[:2]}, {"x": x[2:]}])

    np.testing.assert_allclose(ranges["x"], np.abs(x).reshape(-1, K).max(axis=0))


def test_the_split_graph_computes_what_the_original_does_in_fp32() -> None:
    x = _activations(0)
    model = _matmul_graph(_weight())
    original = _run(model, x)

    done = outliers.split(model, outliers.channel_ranges(model, [{"x": x}]))

    assert done.channels == {"/proj/MatMul": [3, 17]}
    np.testing.assert_allclose(_run(model, x), original, rtol=1e-5, atol=1e-5)


def test_the_split_leaves_a_matmul_without_outlier_channels_as_it_was() -> None:
    x = _activations(0, outlier_scale=1.0)
    model = _matmul_graph(_weight())

    done = outliers.split(model, outliers.channel_ranges(model, [{"x": x}]))

    assert done.channels == {}
    assert [n.op_type for n in model.graph.node] == ["MatMul"]


def test_int8_dynamic_of_the_split_graph_is_closer_to_fp32_than_of_the_original(tmp_path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    calibration, held_out = _activations(0), _activations(1)
    plain, split = _matmul_graph(_weight()), _matmul_graph(_weight())
    reference = _run(plain, held_out)
    done = outliers.split(split, outliers.channel_ranges(split, [{"x": calibration}]))
    errors = {}
    for name, model, exclude in (("plain", plain, []), ("split", split, done.fp32_nodes)):
        onnx.save(model, tmp_path / f"{name}.onnx")
        quantize_dynamic(tmp_path / f"{name}.onnx", tmp_path / f"{name}-int8.onnx", weight_type=QuantType.QInt8, nodes_to_exclude=exclude)
        errors[name] = float(np.abs(_run(str(tmp_path / f"{name}-int8.onnx"), held_out) - reference).mean())

    assert errors["split"] < errors["plain"] / 4
