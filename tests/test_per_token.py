"""Per-token int8 activations (`vlmopt.quantization.per_token`) on small graphs quantized by ONNX Runtime itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from vlmopt.quantization import per_token

K, N = 64, 32


def _matmul(path: Path, opset: int, extra_consumer: bool = False) -> np.ndarray:
    """Y = X W (X [1, tokens, K]), saved at `path`; with `extra_consumer`, X also feeds a second MatMul on the same weight."""
    weight = np.random.default_rng(0).standard_normal((K, N)).astype(np.float32) / 8
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, None, N])]
    if extra_consumer:
        nodes.append(helper.make_node("MatMul", ["x", "w"], ["z"], name="matmul_2"))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, None, N]))
    model = helper.make_model(
        helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, K])], outputs, [numpy_helper.from_array(weight, "w")]),
        opset_imports=[helper.make_opsetid("", opset)],
    )
    onnx.save(model, str(path))
    return weight


def _quantized(tmp_path: Path, opset: int = 18, extra_consumer: bool = False) -> tuple[Path, np.ndarray]:
    """ORT's dynamic int8 of `_matmul`, with 7-bit weights: 8-bit ones saturate the int16 sums of CPUs without VNNI."""
    weight = _matmul(tmp_path / "fp32.onnx", opset, extra_consumer)
    quantize_dynamic(str(tmp_path / "fp32.onnx"), str(tmp_path / "int8.onnx"), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)
    return tmp_path / "int8.onnx", weight


def _rewritten(path: Path) -> tuple[Path, list[str]]:
    model = onnx.load(str(path))
    done = per_token.rewrite(model)
    onnx.checker.check_model(model)
    out = path.with_name("per_token.onnx")
    onnx.save(model, str(out))
    return out, done


def _tokens() -> np.ndarray:
    """Twelve ordinary tokens and one with a massive activation (a first token or delimiter in a trained LLM)."""
    x = np.random.default_rng(1).standard_normal((1, 13, K)).astype(np.float32)
    x[0, 0, 5] = 400.0
    return x


def _ordinary_token_error(path: Path, x: np.ndarray, weight: np.ndarray) -> float:
    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]
    expected = x @ weight
    return float(np.linalg.norm(y[0, 1:] - expected[0, 1:]) / np.linalg.norm(expected[0, 1:]))


def test_per_token_scales_keep_ordinary_tokens_accurate_beside_a_massive_one(tmp_path: Path) -> None:
    per_tensor, weight = _quantized(tmp_path)
    rewritten, done = _rewritten(per_tensor)

    x = _tokens()
    assert done == ["x"]
    # one scale for the tensor rounds the ordinary tokens with the massive one's step; one per token does not
    assert _ordinary_token_error(per_tensor, x, weight) > 0.2
    assert _ordinary_token_error(rewritten, x, weight) < 0.03


def test_the_rewrite_leaves_no_per_tensor_quantizer_behind(tmp_path: Path) -> None:
    rewritten, _ = _rewritten(_quantized(tmp_path)[0])

    ops = {node.op_type for node in onnx.load(str(rewritten)).graph.node}
    assert "DynamicQuantizeLinear" not in ops and {"MatMulInteger", "ReduceMax", "Round"} <= ops


def test_an_input_shared_by_two_matmuls_is_quantized_per_token_once_for_both(tmp_path: Path) -> None:
    per_tensor, weight = _quantized(tmp_path, extra_consumer=True)
    rewritten, done = _rewritten(per_tensor)

    x = _tokens()
    y, z = ort.InferenceSession(str(rewritten), providers=["CPUExecutionProvider"]).run(["y", "z"], {"x": x})
    assert done == ["x"]
    np.testing.assert_allclose(y, z)
    assert float(np.linalg.norm(y[0, 1:] - (x @ weight)[0, 1:]) / np.linalg.norm((x @ weight)[0, 1:])) < 0.03


def test_an_opset_17_graph_takes_reducemaxs_axes_as_an_attribute(tmp_path: Path) -> None:
    per_tensor, weight = _quantized(tmp_path, opset=17)
    rewritten, done = _rewritten(per_tensor)

    reduce = next(n for n in onnx.load(str(rewritten)).graph.node if n.op_type == "ReduceMax")
    assert done == ["x"] and [a.name for a in reduce.attribute] == ["axes", "keepdims"]
    assert _ordinary_token_error(rewritten, _tokens(), weight) < 0.03


@pytest.mark.parametrize("consumer", ["Identity", "Mul"])
def test_a_quantized_tensor_read_by_another_operator_keeps_its_per_tensor_scale(tmp_path: Path, consumer: str) -> None:
    per_tensor, _ = _quantized(tmp_path)
    model = onnx.load(str(per_tensor))
    quantizer = next(n for n in model.graph.node if n.op_type == "DynamicQuantizeLinear")
    model.graph.node.append(helper.make_node(consumer, [quantizer.output[0]] * (2 if consumer == "Mul" else 1), ["other"], name="other"))

    assert per_token.rewrite(model) == []
    assert sum(n.op_type == "DynamicQuantizeLinear" for n in model.graph.node) == 1
