"""A decoder's int4 weights, data-aware: RTN, GPTQ, HQQ, AWQ, or `auto`, and mixed precision by measured sensitivity.

Every method ends in ONNX Runtime's MatMulNBits, so every variant runs on the same kernel:
  * `rtn`: round to nearest per block (ONNX Runtime's `MatMulNBitsQuantizer`, default config). No data.
  * `gptq`: GPTQ (Frantar et al. 2022) on the Hessian X^T X of each MatMul's inputs over calibration text:
    each row of the weight is rounded in turn and its error is spread over the rows not yet rounded, so
    the *output* error, not the weight error, is what is minimised. The Hessians come from ONE run of the
    decoder with every MatMul input exposed. Written here, not `GPTQWeightOnlyQuantConfig`: ONNX Runtime's
    GPTQ (its vendored neural-compressor code) runs the whole model once per distinct MatMul input (121
    runs per sample on SmolLM2-135M), and rounds its result a second time with a fresh min/max per block,
    which moves weights off the grid GPTQ chose. The loop follows its `gptq()` and the paper (lazy batches
    of 128 rows, dampening 1 % of the mean diagonal); the codes are packed by ONNX Runtime's own
    `make_matmul_weight_only_node`.
  * `hqq`: Half-Quadratic Quantization (ONNX Runtime's `HQQWeightOnlyQuantConfig`): no data; scales and
    zero points fitted by a proximal solver. Its zero points are floats, which MatMulNBits runs on a slower
    path at one row (README).
  * `awq`: activation-aware scaling plus scale estimation, NNCF's `compress_weights(awq=True,
    scale_estimation=True)` on its ONNX back end (ONNX Runtime's only AWQ is `nvidia_awq`, which needs
    NVIDIA ModelOpt, CUDA and a dataset download). NNCF reads graphs of standard operators; where it cannot
    read a decoder (the builder's fused operators) the method is refused with NNCF's own reason.
  * `grid`: a dequantized GGUF's matrices kept on their own grids, exactly, each at the narrowest MatMulNBits form
    that holds it (`GRID_FORMS`), detected from the fp32 weights per block of inputs:
      - grids through zero (w = d*(q - z): Q4_0; Q5_0, Q8_0 over blocks of 32; Q6_K, Q3_K over sub-blocks of 16) are
        MatMulNBits' own form: the codes, the step d as the scale (taken back exactly from the block's largest code)
        and an integer zero point, at 4 bits where 16 levels hold the block, else at 8;
      - grids with an offset of their own per block (w = d*q + m: Q4_1, Q4_K; at 8 bits Q5_1, Q5_K) keep the codes
        and d with zero points 0, and the offsets m are added back through the input's block sums,
        y += (x @ E) @ M (E [K, K/32] sums each block, M [K/32, N] holds m). Integer zero points alone cannot hold m
        (on SmolLM2's Q4_1 fewer than 0.5 % of blocks have -m/d on the integer grid) and MatMulNBits' float zero
        points run 30-50x slower at one row (`benchmarks/gguf_grid.py`).
    A Q4_K_M GGUF keeps most of its matrices at more than 4 bits (Gemma 3 270M's: 27 Q4_K, 81 Q5_0, plus Q6_K and
    Q8_0): those stay 8-bit, exactly as the source held them. Matrices on no grid become 8-bit MatMulNBits (rtn).
    Every matrix's form, and why, is in the record.
  * `auto`: each method above in turn (grid only where most matrices are on a 4-bit grid), each scored on the
    gate's text; the best that passes is kept, and the record says what each scored and why the one kept was chosen.

Calibration text is never the text the gate judges on: by default the second half of the same built-in
text (the gate reads its first 2048 tokens), or `--calib-text FILE`.

Mixed precision (`--fallback` on a decoder): the matrices are ranked by the relative error of their own
output when only they are int4 (`fallback.sensitivity`), and the fewest of the most sensitive are kept
at int8 (8-bit MatMulNBits) or fp32 until the token gates pass (`fallback.search`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from vlmopt.errors import VlmoptError

METHODS = ("rtn", "gptq", "hqq", "awq", "grid", "auto")
#: what `auto` tries, in this order: the fast kernels first (hqq's float zero points are slower at one row)
AUTO_ORDER = ("rtn", "gptq", "awq", "hqq")
#: methods that read calibration text
DATA_AWARE = ("gptq", "awq", "auto")
#: methods whose MatMulNBits carry float zero points (a slower kernel path at batch 1)
FLOAT_ZERO_POINTS = ("hqq",)
#: calibration: windows of this many tokens, each a fresh prefill
CALIB_WINDOW = 128
#: what the kept matrices of a decoder's mixed precision become
KEEP_PRECISIONS = ("int8", "fp32")
#: GPTQ: rows per lazy batch and dampening (the paper's and ONNX Runtime's defaults)
GPTQ_BATCH, GPTQ_DAMP = 128, 0.01


# -- calibration text ----------------------------------------------------------------------------
@dataclass
class CalibrationText:
    """The windows of token ids a data-aware method calibrates on, and where they came from."""

    windows: list[np.ndarray]
    source: str

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "windows": len(self.windows), "window": CALIB_WINDOW, "tokens": int(sum(len(w) for w in self.windows))}


def builtin_text() -> tuple[str, str]:
    """The built-in calibration text: the second half of the gate's text (`english_text`), from a paragraph start."""
    from vlmopt.samples import TEXT_SOURCE, english_text
    from vlmopt.verification.generation import TEXT_TOKENS

    text = english_text()
    start = text.index("\n\n", len(text) // 2) + 2
    # the gate tokenizes at most its first TEXT_TOKENS * 12 characters (`samples.text_tokens`)
    assert start > TEXT_TOKENS * 12, "the calibration half must not overlap the gate's text"
    return text[start:], f"{TEXT_SOURCE}, from character {start} on (the gate reads only its start)"


def read_text(path: Path) -> str:
    """A user's calibration text: UTF-8, not empty."""
    if not path.is_file():
        raise VlmoptError(f"--calib-text {path} is not a file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise VlmoptError(f"--calib-text {path} is not UTF-8 text (byte {exc.start} is not UTF-8); save it as UTF-8") from None
    except OSError as exc:
        raise VlmoptError(f"--calib-text {path} cannot be read ({exc.strerror})") from None
    if not text.strip():
        raise VlmoptError(f"--calib-text {path} is empty; give real text in the language the model will see")
    return text


def calibration_text(tokenizer: Any, path: str | None, windows: int) -> CalibrationText:
    """Up to `windows` windows of CALIB_WINDOW tokens of the built-in calibration text, or of the user's file."""
    if path:
        text, source = read_text(Path(path)), f"your text {path}"
    else:
        text, source = builtin_text()
    ids = np.asarray(tokenizer(text[: windows * CALIB_WINDOW * 12], add_special_tokens=False)["input_ids"], dtype=np.int64)
    if len(ids) < CALIB_WINDOW:
        raise VlmoptError(
            f"--calib-text {path} holds {len(ids)} tokens, fewer than one calibration window of {CALIB_WINDOW}; give a longer text"
            if path
            else f"the built-in calibration text gave {len(ids)} tokens, fewer than one window of {CALIB_WINDOW}"
        )
    count = min(windows, len(ids) // CALIB_WINDOW)
    return CalibrationText([ids[i * CALIB_WINDOW : (i + 1) * CALIB_WINDOW] for i in range(count)], source)


# -- decoder feeds -------------------------------------------------------------------------------
def prefill_feed(session: Any, inputs_embeds: np.ndarray) -> dict[str, np.ndarray]:
    """A prefill of one row for any decoder contract: the embeddings, a full mask, empty pasts, every other input
    at its neutral value (positions 0.., on each of M-RoPE's axes; logits_to_keep 0: every position; a family's
    per-position inputs such as Gemma 3's token_type_ids 0: text)."""
    feed: dict[str, np.ndarray] = {}
    length = inputs_embeds.shape[1]
    for spec in session.get_inputs():
        if spec.name == "inputs_embeds":
            feed[spec.name] = inputs_embeds.astype(np.float16 if spec.type == "tensor(float16)" else np.float32)
        elif spec.name == "attention_mask":
            feed[spec.name] = np.ones((1, length), np.int64)
        elif spec.name == "position_ids":
            positions = np.arange(length, dtype=np.int64)[None]
            feed[spec.name] = np.ascontiguousarray(np.broadcast_to(positions, (int(spec.shape[0]), 1, length))) if len(spec.shape) == 3 else positions
        elif spec.name.startswith("past_key_values."):
            feed[spec.name] = np.zeros((1, int(spec.shape[1]), 0, int(spec.shape[3])), np.float16 if spec.type == "tensor(float16)" else np.float32)
        elif not spec.shape:
            feed[spec.name] = np.array(0, np.int64)
        elif len(spec.shape) == 2 and spec.type == "tensor(int64)":
            feed[spec.name] = np.zeros((1, length), np.int64)
        else:
            raise VlmoptError(f"the decoder takes an input vlmopt cannot fill for calibration: {spec.name} {spec.shape}")
    return feed


def embed(embedding: Any, ids: np.ndarray, hidden: int) -> np.ndarray:
    """Token ids [n] through the embedding part (no image; a bare language model's takes the ids alone): [1, n, hidden]."""
    feed = {"input_ids": ids[None].astype(np.int64)}
    if any(i.name == "image_features" for i in embedding.get_inputs()):
        feed["image_features"] = np.zeros((0, hidden), np.float32)
    return embedding.run(["inputs_embeds"], feed)[0]


def decoder_feeds(embedding: Any, decoder: Any, windows: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    hidden = int(next(i for i in decoder.get_inputs() if i.name == "inputs_embeds").shape[2])
    return [prefill_feed(decoder, embed(embedding, w, hidden)) for w in windows]


# -- the methods ---------------------------------------------------------------------------------
@dataclass
class Settings:
    """What every method shares: the MatMulNBits block, symmetry and compute (accuracy level)."""

    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 4
    exclude: list[str] = field(default_factory=list)
    threads: int | None = None


def weight_matmuls(model: Any) -> list[Any]:
    """MatMul nodes whose second input is a 2-D initializer (the weights a method quantizes)."""
    weights = {t.name: t for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights and len(weights[n.input[1]].dims) == 2]


def rtn(model: Any, settings: Settings, bits: int = 4) -> Any:
    """Round to nearest, ONNX Runtime's default MatMulNBits quantizer."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        copy.deepcopy(model),
        bits=bits,
        block_size=settings.block_size,
        is_symmetric=settings.symmetric,
        accuracy_level=settings.accuracy_level,
        nodes_to_exclude=settings.exclude or None,
        op_types_to_quantize=("MatMul",),
    )
    quantizer.process()
    return quantizer.model.model


def hqq(model: Any, settings: Settings) -> Any:
    """HQQ, ONNX Runtime's HQQ config (float zero points); accuracy level set on the nodes it writes."""
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = HQQWeightOnlyQuantConfig(block_size=settings.block_size, bits=4, op_types_to_quantize=("MatMul",))
    quantizer = MatMulNBitsQuantizer(copy.deepcopy(model), nodes_to_exclude=settings.exclude or None, algo_config=config)
    quantizer.process()
    out = quantizer.model.model
    _set_accuracy_level(out, settings.accuracy_level)
    return out


def awq(model: Any, settings: Settings, feeds: list[dict[str, np.ndarray]]) -> Any:
    """AWQ and scale estimation, NNCF's weight compression on its ONNX back end."""
    import nncf

    mode = nncf.CompressWeightsMode.INT4_SYM if settings.symmetric else nncf.CompressWeightsMode.INT4_ASYM
    ignored = nncf.IgnoredScope(names=settings.exclude, validate=False) if settings.exclude else None
    try:
        out = nncf.compress_weights(
            copy.deepcopy(model),
            mode=mode,
            ratio=1.0,
            group_size=settings.block_size,
            all_layers=True,
            dataset=nncf.Dataset(feeds),
            subset_size=len(feeds),
            awq=True,
            scale_estimation=True,
            ignored_scope=ignored,
        )
    except Exception as exc:  # NNCF's own errors name what it cannot do; a bug of ours still surfaces as the message
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise VlmoptError(f"--method awq: NNCF {nncf.__version__} cannot compress this decoder: {first}; use --method gptq or rtn") from exc
    if not any(n.op_type == "MatMulNBits" for n in out.graph.node):
        raise VlmoptError(
            f"--method awq: NNCF {nncf.__version__} wrote no MatMulNBits (opset {_opset(out)} takes DequantizeLinear blocks instead); use --method gptq or rtn"
        )
    _set_accuracy_level(out, settings.accuracy_level)
    return out


def _opset(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _set_accuracy_level(model: Any, level: int) -> None:
    import onnx

    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*kept, onnx.helper.make_attribute("accuracy_level", level)])


def hessians(model: Any, feeds: list[dict[str, np.ndarray]], threads: int | None) -> dict[str, np.ndarray]:
    """{MatMul input: mean of x x^T over every calibration position}, from one run per feed with every input of a
    weight MatMul exposed as an output."""
    import onnx

    from vlmopt.quantization.fallback import session

    inputs = sorted({n.input[0] for n in weight_matmuls(model)})
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    probe.graph.output.extend([onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in inputs if name not in have])
    sess = session(probe, threads)
    del probe
    sums: dict[str, np.ndarray] = {}
    rows = 0
    for feed in feeds:
        outputs = sess.run(inputs, feed)
        for name, x in zip(inputs, outputs, strict=True):
            x = x.reshape(-1, x.shape[-1]).astype(np.float64)
            sums[name] = sums.get(name, 0.0) + x.T @ x
        rows += int(np.prod(outputs[0].shape[:-1]))
    return {name: h * (2.0 / max(rows, 1)) for name, h in sums.items()}


def _group_params(w: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per column, the scale and zero point of one block of rows, as MatMulNBits reads them."""
    maxq = 2**bits - 1
    if symmetric:  # ONNX Runtime's convention: the signed extreme maps to -2^(bits-1), zero point 2^(bits-1)
        high, low = w.max(0), w.min(0)
        extreme = np.where(np.abs(high) > np.abs(low), high, low)
        scale = extreme / -(2 ** (bits - 1))
        scale = np.where(scale == 0, 1.0, scale)
        return scale, np.full(w.shape[1], 2 ** (bits - 1), np.float64)
    low, high = w.min(0), w.max(0)
    scale = (high - low) / maxq
    scale = np.where(scale == 0, 1.0, scale)
    return scale, np.clip(np.round(-low / scale), 0, maxq)


def gptq_codes(weight: np.ndarray, hessian: np.ndarray, block: int, bits: int = 4, symmetric: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ of one weight [K, N] (rows are the input features) against its inputs' Hessian [K, K]: the codes [K, N],
    scales and zero points [K / block, N]."""
    maxq = 2**bits - 1
    w = weight.astype(np.float64).copy()
    rows, cols = w.shape
    h = hessian.copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead, :] = 0.0
    h[np.arange(rows), np.arange(rows)] += GPTQ_DAMP * np.mean(np.diag(h))
    try:
        hinv = np.linalg.cholesky(np.linalg.inv(h)).T
    except np.linalg.LinAlgError:
        h[np.arange(rows), np.arange(rows)] += 0.1 * np.mean(np.diag(h))
        hinv = np.linalg.cholesky(np.linalg.inv(h)).T
    codes = np.zeros((rows, cols), np.uint8)
    scales = np.zeros((rows // block, cols))
    zeros = np.zeros((rows // block, cols))
    batch = max(GPTQ_BATCH, block)
    scale = zero = None
    for i1 in range(0, rows, batch):
        i2 = min(i1 + batch, rows)
        w1 = w[i1:i2].copy()
        errors = np.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            row = i1 + i
            if row % block == 0:
                scale, zero = _group_params(w1[i : i + block], bits, symmetric)
                scales[row // block], zeros[row // block] = scale, zero
            q = np.clip(np.round(w1[i] / scale) + zero, 0, maxq)
            codes[row] = q.astype(np.uint8)
            error = (w1[i] - scale * (q - zero)) / hinv1[i, i]
            w1[i:] -= np.outer(hinv1[i, i:], error)  # row i of the upper Cholesky factor (the paper's Hinv[i, i:])
            errors[i] = error
        w[i2:] -= hinv[i1:i2, i2:].T @ errors
    return codes, scales, zeros


def _readers(model: Any) -> dict[str, int]:
    """How many nodes read each tensor (a weight read by one MatMul alone can be dropped once that MatMul is replaced)."""
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    return readers


def _rewritten(model: Any, replaced: dict[str, list[Any]], dropped: set[str], added: list[Any]) -> Any:
    """`model` (changed in place) with each node named in `replaced` swapped for its nodes, the `dropped` initializers
    gone, the `added` ones in, and the com.microsoft opset that MatMulNBits needs."""
    import onnx

    nodes = [n for node in model.graph.node for n in replaced.get(node.name, [node])]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    kept = [t for t in model.graph.initializer if t.name not in dropped]
    del model.graph.initializer[:]
    model.graph.initializer.extend([*kept, *added])
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return model


def _four_bit_node(node: Any, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, block: int, accuracy_level: int) -> tuple[Any, list[Any]]:
    """A 4-bit MatMulNBits for `node` from codes [K, N] and per-block scales and zero points [K/block, N] (None:
    symmetric), and the initializers it reads."""
    return _nbits_node(node, 4, codes, scales, zeros, block, accuracy_level)


def gptq(model: Any, settings: Settings, feeds: list[dict[str, np.ndarray]], say: Callable[[str], None] = lambda m: None) -> Any:
    """Every weight MatMul (but `settings.exclude`) as a GPTQ-rounded 4-bit MatMulNBits."""
    from onnx import numpy_helper

    say(f"GPTQ: collecting the inputs' Hessians over {len(feeds)} calibration windows")
    found = hessians(model, feeds, settings.threads)
    out = copy.deepcopy(model)
    weights = {t.name: t for t in out.graph.initializer}
    readers = _readers(out)
    block = settings.block_size
    replaced, added, dropped = {}, [], set()
    nodes = [n for n in weight_matmuls(out) if n.name not in settings.exclude]
    say(f"GPTQ: rounding {len(nodes)} matrices")
    for node in nodes:
        weight = numpy_helper.to_array(weights[node.input[1]]).astype(np.float32)
        rows, cols = weight.shape
        if rows % block:
            continue  # MatMulNBits pads; GPTQ's groups would not line up with its blocks: left fp32, as RTN would pad it
        codes, scales, zeros = gptq_codes(weight, found[node.input[0]], block, 4, settings.symmetric)
        new, inits = _four_bit_node(
            node, codes, scales.astype(np.float32), None if settings.symmetric else zeros.astype(np.uint8), block, settings.accuracy_level
        )
        replaced[node.name] = new
        added += inits
        if readers.get(node.input[1], 0) == 1:
            dropped.add(node.input[1])
    return _rewritten(out, {name: [node] for name, node in replaced.items()}, dropped, added)


#: the forms `grid` keeps a matrix in, narrowest first: (bits, block rows, float block offsets), and the GGUF types each
#: holds exactly. Integer zero points hold a grid anchored at zero (w = d*(q - z)); a grid with an arbitrary offset per
#: block (w = d*q + m) needs the offsets added back (module docstring).
GRID_FORMS = (
    (4, 32, False, "Q4_0"),
    (4, 32, True, "Q4_1/Q4_K"),
    (8, 32, False, "Q5_0/Q8_0"),
    (8, 16, False, "Q6_K/Q3_K"),
    (8, 32, True, "Q5_1/Q5_K"),
    (8, 16, True, "Q2_K"),
)
#: columns examined at once (a 262144-token head would otherwise take gigabytes of float64)
GRID_CHUNK = 8192


@dataclass
class GridForm:
    """One matrix [K, N] on a GGUF grid, as MatMulNBits takes it: `bits`-bit codes over blocks of `block` rows with
    integer zero points (w = scale*(code - zero)), or with zero points 0 and float block offsets (w = scale*code + low)."""

    bits: int
    block: int
    offsets: bool
    gguf: str
    codes: np.ndarray  # [K, N] uint8
    scales: np.ndarray  # [K/block, N] float32
    zeros: np.ndarray  # [K/block, N]: uint8 zero points, or float32 offsets
    error: float  # max |rebuilt - w| over max |w|

    @property
    def key(self) -> str:
        return f"q{self.bits}b{self.block}" + ("+offsets" if self.offsets else "")

    @property
    def label(self) -> str:
        return grid_label(self.key)


def grid_label(key: str) -> str:
    """'q8b16' -> '8-bit, blocks of 16, zero points (GGUF Q6_K)'."""
    bits, _, rest = key[1:].partition("b")
    block, _, offsets = rest.partition("+")
    gguf = next(g for b, k, o, g in GRID_FORMS if (b, k, o) == (int(bits), int(block), bool(offsets)))
    return f"{bits}-bit, blocks of {block}, {'block offsets' if offsets else 'zero points'} (GGUF {gguf})"


def _block_grid(blocks: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Blocks [nb, n, B] (float64, a block's weights last) each on a grid of at most `levels` steps above its minimum:
    (codes [nb, n, B], step [nb, n], low [nb, n]); None where any block is not (within 1 % of a step). The step is the
    smallest gap between two values of the block over 1..8: the two closest codes present may be several steps apart,
    more so at 8 bits."""
    low = blocks.min(-1)
    gaps = np.diff(np.sort(blocks, axis=-1), axis=-1)
    floor = 1e-6 * max(float(np.abs(blocks).max()), 1e-30)
    smallest = np.where(gaps > floor, gaps, np.inf).min(-1)
    flat = ~np.isfinite(smallest)  # every weight of the block equal: any step holds it
    scale = np.where(flat, np.maximum(np.abs(low), 1e-30), 1.0)  # a flat block's step is its value: low/step stays whole
    step = np.full(low.shape, np.nan)
    for divisor in range(1, 9):
        candidate = np.where(flat, scale, smallest / divisor)
        codes = np.round((blocks - low[..., None]) / candidate[..., None])
        rebuilt = codes * candidate[..., None] + low[..., None]
        ok = (codes.max(-1) <= levels - 1) & np.all(np.abs(rebuilt - blocks) <= 0.01 * candidate[..., None], axis=-1)
        step = np.where(ok & np.isnan(step), candidate, step)
        if not np.isnan(step).any():
            break
    if np.isnan(step).any():
        return None
    return np.round((blocks - low[..., None]) / step[..., None]), step, low


def _grid_chunk(w: np.ndarray, bits: int, block: int, offsets: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """One column chunk [K, n] in one form: (codes [K, n] uint8, scales [K/block, n] fp32, zeros or offsets), or None."""
    rows, cols = w.shape
    maxq = 2**bits - 1
    blocks = np.ascontiguousarray(w.reshape(rows // block, block, cols).transpose(0, 2, 1), dtype=np.float64)
    found = _block_grid(blocks, 2**bits)
    if found is None:
        return None
    codes, step, low = found

    def unblocked(c: np.ndarray) -> np.ndarray:
        return c.transpose(0, 2, 1).reshape(rows, cols).astype(np.uint8)

    if offsets:
        return unblocked(codes), step.astype(np.float32), low.astype(np.float32)
    anchor = low / step  # the grid holds 0 where low is a whole number of steps: integer zero points hold it
    span = codes.max(-1)
    for divisor in range(2, 9):  # a block whose codes share a factor (all even: 1 in 2^15 blocks of 16) shows a multiple of d
        off = np.abs(anchor - np.round(anchor)) > 0.01
        if not off.any():
            break
        finer = off & (span * divisor <= maxq) & (np.abs(low / (step / divisor) - np.round(low / (step / divisor))) <= 0.01)
        step = np.where(finer, step / divisor, step)
        anchor = low / step
    if np.abs(anchor - np.round(anchor)).max() > 0.01:
        return None
    codes = np.round((blocks - low[..., None]) / step[..., None])
    signed = codes + np.round(anchor)[..., None]  # w = step * signed
    lowest, highest = signed.min(-1), signed.max(-1)
    if (highest - lowest).max() > maxq:
        return None
    zero = np.clip(2 ** (bits - 1), -lowest, maxq - highest)
    # the scale from the block's largest code: w = fp32(d * k) gives back d exactly, as the GGUF dequantizer computed it
    at = np.abs(signed).argmax(-1)[..., None]
    picked = np.take_along_axis(signed, at, -1)[..., 0]
    value = np.take_along_axis(blocks, at, -1)[..., 0]
    scale = np.where(picked != 0, value / np.where(picked != 0, picked, 1), 1.0).astype(np.float32)
    return unblocked(signed + zero[..., None]), scale, zero.astype(np.uint8)


def gguf_grid(weight: np.ndarray, forms: tuple[tuple[int, int, bool, str], ...] = GRID_FORMS) -> GridForm | None:
    """The narrowest of `forms` that holds a MatMul weight [K, N] (its blocks run along K, as GGUF's along a row's
    inputs), checked by rebuilding it as MatMulNBits does; None where none does."""
    rows, cols = weight.shape
    for bits, block, offsets, gguf in forms:
        if rows % block:
            continue
        parts = []
        for start in range(0, cols, GRID_CHUNK):
            part = _grid_chunk(weight[:, start : start + GRID_CHUNK], bits, block, offsets)
            if part is None:
                break
            parts.append(part)
        else:
            codes, scales, zeros = (np.concatenate([p[i] for p in parts], axis=1) for i in range(3))
            form = GridForm(bits, block, offsets, gguf, codes, scales, zeros, 0.0)
            form.error = float(np.abs(grid_rebuilt(form) - weight).max() / max(float(np.abs(weight).max()), 1e-30))
            return form
    return None


def grid_rebuilt(form: GridForm) -> np.ndarray:
    """The weight [K, N] as MatMulNBits' fp32 path rebuilds it from the form."""
    scales = np.repeat(form.scales, form.block, axis=0)
    if form.offsets:
        return form.codes.astype(np.float32) * scales + np.repeat(form.zeros, form.block, axis=0)
    return (form.codes.astype(np.float32) - np.repeat(form.zeros, form.block, axis=0).astype(np.float32)) * scales


def four_bit_grid(weight: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """A MatMul weight [K, N] whose every block of `block` rows per column is a 16-level grid, w = step*code + low:
    (codes [K, N] in 0..15, step [K/block, N], low [K/block, N]); None where it is not (within 1 % of a step)."""
    form = gguf_grid(weight, ((4, block, True, "Q4_1/Q4_K"),))
    return None if form is None else (form.codes, form.scales, form.zeros)


def readable(node: Any) -> str:
    """A MatMul node's matrix as the model names it (layers.3.mlp.down_proj): from the PyTorch exporter's name scopes
    where it recorded them, else from a builder's node name ('/model/layers.3/mlp/down_proj/MatMul')."""
    import ast

    name = node if isinstance(node, str) else node.name
    scopes = {} if isinstance(node, str) else {p.key: p.value for p in node.metadata_props}
    if "pkg.torch.onnx.name_scopes" in scopes:
        try:
            found = [s for s in ast.literal_eval(scopes["pkg.torch.onnx.name_scopes"]) if s]
        except (ValueError, SyntaxError):
            found = []
        modules = [s for s in found if "." in s or s in ("lm_head",)]
        if modules:
            return _trimmed(modules[-1])
    parts = [p for p in name.strip("/").split("/") if p and not p.startswith("MatMul")]
    return _trimmed(".".join(parts)) or name


def _trimmed(path: str) -> str:
    """A module path from its decoder layer on (`layers.3.mlp.down_proj`): the modules that wrap the layers differ by
    family and say nothing about the matrix. A path outside the layers (`lm_head`) stays as it is."""
    parts = path.split(".")
    return ".".join(parts[parts.index("layers") :]) if "layers" in parts else path


def matrix_names(model: Any) -> dict[str, str]:
    """{weight MatMul node: its matrix's readable name}."""
    return {n.name: readable(n) for n in weight_matmuls(model)}


def grid_plan(model: Any, settings: Settings, say: Callable[[str], None] = lambda m: None) -> dict[str, GridForm | None]:
    """{weight MatMul (not excluded): the narrowest GGUF grid form that holds its weight exactly, or None}."""
    from onnx import numpy_helper

    weights = {t.name: t for t in model.graph.initializer}
    nodes = [n for n in weight_matmuls(model) if n.name not in settings.exclude]
    plan: dict[str, GridForm | None] = {}
    for i, node in enumerate(nodes):
        if i and i % 25 == 0:
            say(f"grid: looked at {i} of {len(nodes)} matrices")
        plan[node.name] = gguf_grid(numpy_helper.to_array(weights[node.input[1]]))
    return plan


def grid_share(model: Any, settings: Settings, plan: dict[str, GridForm | None] | None = None) -> tuple[int, int]:
    """How many of the model's weight matrices (not excluded) are on some GGUF grid, of how many."""
    plan = grid_plan(model, settings) if plan is None else plan
    return sum(f is not None for f in plan.values()), len(plan)


def grid_summary(plan: dict[str, GridForm | None], names: dict[str, str] | None = None) -> dict[str, Any]:
    """Counts by form, and per matrix the form it got and why (the record)."""
    forms: dict[str, int] = {}
    matrices = []
    for node, form in plan.items():
        label = form.label if form else "8-bit rtn (on no GGUF grid)"
        forms[label] = forms.get(label, 0) + 1
        why = (
            f"every block of {form.block} rows is on a grid of at most {2**form.bits} levels"
            + (" with an offset of its own" if form.offsets else " through zero")
            + f"; rebuilt to {form.error:.1e} of its largest weight"
            if form
            else "its blocks are on no 4-bit or 8-bit grid (not a GGUF matrix, or a type with no exact form): round to nearest at 8 bits"
        )
        matrices.append(
            {"matrix": (names or {}).get(node, readable(node)), "node": node, "form": label, "why": why, **({"max_relative_error": form.error} if form else {})}
        )
    return {"forms": forms, "matrices": matrices}


def is_grid_node(node: Any, bits: int | None = None) -> bool:
    """A MatMulNBits `grid` wrote (kept on its own grid), of `bits` if given."""
    return node.op_type == "MatMulNBits" and "/grid:q" in node.name and (bits is None or node.name.split("/grid:q")[1].startswith(f"{bits}b"))


def _nbits_node(
    node: Any, bits: int, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, block: int, accuracy_level: int
) -> tuple[Any, list[Any]]:
    """A `bits`-bit MatMulNBits for `node` from codes [K, N] and per-block scales and zero points [K/block, N] (None:
    the default), and the initializers it reads."""
    from onnxruntime.quantization.neural_compressor.weight_only import make_matmul_weight_only_node

    rows, cols = codes.shape
    blocks = rows // block
    new, inits = make_matmul_weight_only_node(
        node=node,
        weight_shape=(rows, cols),
        num_bits=bits,
        group_size=block,
        k_blocks=blocks,
        q_weight=codes.T.reshape(cols * blocks, block),
        scale=scales.T.reshape(-1),
        zero_point=None if zeros is None else zeros.T.reshape(-1),
        accuracy_level=accuracy_level,
    )
    return new, inits


def grid(model: Any, settings: Settings, say: Callable[[str], None] = lambda m: None, plan: dict[str, GridForm | None] | None = None) -> Any:
    """Every matrix on a GGUF grid kept on it exactly, at the narrowest form that holds it (the module docstring's
    `grid`); the rest 8-bit by rtn."""
    from onnx import helper, numpy_helper

    plan = grid_plan(model, settings, say) if plan is None else plan
    out = copy.deepcopy(model)
    readers = _readers(out)
    replaced: dict[str, list[Any]] = {}
    added, dropped, summers = [], set(), {}
    for node in [n for n in weight_matmuls(out) if plan.get(n.name) is not None]:
        form = plan[node.name]
        assert form is not None
        rows, cols = form.codes.shape
        blocks = rows // form.block
        zeros = np.zeros((blocks, cols), np.uint8) if form.offsets else form.zeros
        new, inits = _nbits_node(node, form.bits, form.codes, form.scales, zeros, form.block, settings.accuracy_level)
        new.name = f"{node.name}/grid:{form.key}"
        added += inits
        if readers.get(node.input[1], 0) == 1:
            dropped.add(node.input[1])
        if not form.offsets:
            replaced[node.name] = [new]
            continue
        main = f"{node.output[0]}/grid_codes"
        new.output[0] = main
        key = (rows, form.block)
        if key not in summers:  # one block-sum matrix per input width and block, shared
            summers[key] = f"grid_block_sums_{rows}x{blocks}"
            added.append(numpy_helper.from_array(np.kron(np.eye(blocks, dtype=np.float32), np.ones((form.block, 1), np.float32)), summers[key]))
        offsets = f"{node.input[1]}/grid_offsets"
        added.append(numpy_helper.from_array(form.zeros, offsets))
        sums, shift = f"{node.output[0]}/grid_sums", f"{node.output[0]}/grid_shift"
        replaced[node.name] = [
            new,
            helper.make_node("MatMul", [node.input[0], summers[key]], [sums], name=f"{node.name}/grid_sums"),
            helper.make_node("MatMul", [sums, offsets], [shift], name=f"{node.name}/grid_shift"),
            helper.make_node("Add", [main, shift], [node.output[0]], name=f"{node.name}/grid_add"),
        ]
    summary = grid_summary(plan)
    say(
        f"grid: {len(replaced)} of {len(plan)} matrices are on a GGUF grid and kept on it ("
        + ", ".join(f"{n} {label}" for label, n in summary["forms"].items())
        + ")"
    )
    out = _rewritten(out, replaced, dropped, added)
    # the block sums and offsets are float MatMuls of their own: the rounding of the rest must leave them alone
    helpers = [n.name for nodes in replaced.values() for n in nodes if n.op_type == "MatMul"]
    rest = [n.name for n in weight_matmuls(out) if n.name not in settings.exclude and n.name not in helpers]
    return rtn(out, replace(settings, exclude=[*settings.exclude, *helpers]), bits=8) if rest else out


def quantize(
    method: str,
    model: Any,
    settings: Settings,
    feeds: list[dict[str, np.ndarray]] | None,
    say: Callable[[str], None] = lambda m: None,
    plan: dict[str, GridForm | None] | None = None,
) -> Any:
    """The model with its weight MatMuls as 4-bit MatMulNBits by `method` (not auto); `plan`: grid's, where known."""
    if method == "rtn":
        return rtn(model, settings)
    if method == "grid":
        return grid(model, settings, say, plan)
    if method == "hqq":
        return hqq(model, settings)
    if method == "gptq":
        return gptq(model, settings, feeds or [], say)
    if method == "awq":
        return awq(model, settings, feeds or [])
    raise ValueError(method)


def describe(method: str, settings: Settings) -> str:
    kind = "symmetric" if settings.symmetric else "asymmetric"
    zero = ", float zero points" if method in FLOAT_ZERO_POINTS else ""
    if method == "grid":
        return (
            "each matrix on its source's own GGUF grid, exactly, at the narrowest MatMulNBits form that holds it (4-bit: Q4_0, "
            "Q4_1, Q4_K; 8-bit: Q5_0, Q5_1, Q5_K, Q6_K, Q8_0); matrices on no grid 8-bit (rtn)"
        )
    return f"int4 {kind}, blocks of {settings.block_size}{zero}, {method}"


# -- scoring on the gate's text ------------------------------------------------------------------
def text_feeds(embedding: Any, reference: Any, ids: np.ndarray, window: int) -> list[dict[str, np.ndarray]]:
    """The gate's text [n] as prefill feeds of `window` tokens each (whole windows only), as the token gates read it."""
    hidden = int(next(i for i in reference.get_inputs() if i.name == "inputs_embeds").shape[2])
    return [prefill_feed(reference, embed(embedding, ids[s : s + window], hidden)) for s in range(0, len(ids) - window + 1, window)]


class TokenScorer:
    """Teacher-forced top-1 agreement and perplexity increase of candidate decoders against the fp32 one, on the
    gate's text (`verification.generation`'s measure, with the embedding part shared), the fp32 side computed once."""

    def __init__(self, embedding: Any, reference: Any, ids: np.ndarray, window: int, threads: int | None):
        self.threads = threads
        chunks = [ids[s : s + window] for s in range(0, len(ids) - window + 1, window)]
        self.feeds = text_feeds(embedding, reference, ids, window)
        self.targets = [c[1:] for c in chunks]
        self.top1, nll = [], []
        for feed, target in zip(self.feeds, self.targets, strict=True):
            top1, picked = self._score(reference, feed, target)
            self.top1.append(top1)
            nll.append(picked)
        self.ppl = float(np.exp(np.concatenate(nll).mean()))

    @staticmethod
    def _score(sess: Any, feed: dict[str, np.ndarray], target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits = sess.run(["logits"], feed)[0][0, :-1].astype(np.float64)
        shifted = logits - logits.max(-1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        return logits.argmax(-1), -logp[np.arange(len(target)), target]

    def __call__(self, model: Any) -> dict[str, float]:
        from vlmopt.quantization.fallback import session

        sess = session(model, self.threads)
        agree, nll = [], []
        for feed, target, top1 in zip(self.feeds, self.targets, self.top1, strict=True):
            picked, losses = self._score(sess, feed, target)
            agree.append(picked == top1)
            nll.append(losses)
        ppl = float(np.exp(np.concatenate(nll).mean()))
        return {"top1_agreement": float(np.concatenate(agree).mean()), "ppl_increase": ppl / self.ppl - 1, "positions": int(sum(len(t) for t in self.targets))}


def passes(scores: dict[str, float], min_agreement: float | None, max_ppl: float | None) -> bool:
    return margin(scores, min_agreement, max_ppl) >= 0


def margin(scores: dict[str, float], min_agreement: float | None, max_ppl: float | None) -> float:
    """How far inside both token gates the scores are (negative: outside one); gates that are off do not count."""
    margins = []
    if min_agreement is not None:
        margins.append(scores["top1_agreement"] - min_agreement)
    if max_ppl is not None:
        margins.append(max_ppl - scores["ppl_increase"])
    return min(margins) if margins else float("inf")


@dataclass
class AutoChoice:
    method: str
    why: str
    tried: dict[str, dict[str, Any]]


def choose(tried: dict[str, dict[str, Any]], min_agreement: float | None, max_ppl: float | None) -> AutoChoice:
    """The method `auto` keeps: of those that pass both token gates, a fast-kernel one first, then the highest
    agreement; when none passes, the highest agreement (the gate then fails, or mixed precision takes over)."""
    ran = {m: t for m, t in tried.items() if "error" not in t}
    if not ran:
        raise VlmoptError("--method auto: no method could quantize this decoder: " + "; ".join(f"{m}: {t['error']}" for m, t in tried.items()))
    passing = [m for m, t in ran.items() if t["passed"]]
    if passing:
        best = max(passing, key=lambda m: (m not in FLOAT_ZERO_POINTS, ran[m]["top1_agreement"], -ran[m]["ppl_increase"]))
        slow = " (float zero points: slower at one row)" if best in FLOAT_ZERO_POINTS else ""
        why = (
            f"{best} passed the token gates with the highest agreement among {'the fast-kernel methods that passed' if not slow else 'those that passed'}{slow}"
        )
        return AutoChoice(best, why, tried)
    best = max(ran, key=lambda m: (ran[m]["top1_agreement"], -ran[m]["ppl_increase"]))
    return AutoChoice(best, f"no method passed the token gates; {best} came closest (highest agreement)", tried)


def auto(
    model: Any,
    settings: Settings,
    feeds: list[dict[str, np.ndarray]],
    scorer: TokenScorer,
    gates: tuple[float | None, float | None],
    say: Callable[[str], None],
) -> tuple[Any, AutoChoice, dict[str, GridForm | None]]:
    """Every method in AUTO_ORDER, and grid first where at least half the decoder's matrices are on a GGUF grid (a
    dequantized GGUF), scored on the gate's text; the chosen graph, why, and grid's plan. Where grid is not tried,
    `tried` says why."""
    tried: dict[str, dict[str, Any]] = {}
    graphs: dict[str, Any] = {}
    plan = grid_plan(model, settings, say)
    on_grid, total = grid_share(model, settings, plan)
    if total and on_grid * 2 >= total:
        order = ("grid", *AUTO_ORDER)
    else:
        order = AUTO_ORDER
        tried["grid"] = {"error": f"not tried: {on_grid} of {total} matrices are on a GGUF grid (fewer than half)"}
    for method in order:
        say(f"auto: {method}")
        started = time.perf_counter()
        try:
            graphs[method] = quantize(method, model, settings, feeds, say, plan)
        except VlmoptError as exc:
            tried[method] = {"error": exc.message}
            continue
        scores = scorer(graphs[method])
        tried[method] = {**scores, "passed": passes(scores, *gates), "seconds": round(time.perf_counter() - started, 1)}
        say(f"auto: {method} top-1 agreement {scores['top1_agreement']:.4f}, perplexity {scores['ppl_increase']:+.2%}")
    choice = choose(tried, *gates)
    return graphs[choice.method], choice, plan


# -- mixed precision -----------------------------------------------------------------------------
#: appended to the names of the int8 weights a mixed graph takes in
INT8_SUFFIX = "__int8"


class Int8Keeper:
    """The int4 graph with chosen matrices at 8-bit MatMulNBits instead, as `fallback.search` edits graphs
    (`quantized`, `candidates`, `revert(kept)`): nodes are swapped by the output they write, which every
    quantizer keeps."""

    def __init__(self, splicer: Any, int8: Any):
        self.splicer = splicer
        self.quantized = splicer.quantized
        self.candidates = splicer.candidates
        self.q8_producer = {o: n for n in int8.graph.node for o in n.output}
        self.q8_init = {t.name: t for t in int8.graph.initializer}

    def revert(self, kept: list[str]) -> Any:
        model = copy.deepcopy(self.quantized)
        outputs = {self.splicer.slices[k].outputs[0]: k for k in kept if k in self.splicer.slices}
        nodes, inits = [], []
        for node in model.graph.node:
            donor = self.q8_producer.get(node.output[0]) if node.output and node.output[0] in outputs else None
            if donor is None:
                nodes.append(node)
                continue
            # both quantizers name a weight's scales alike (`<weight>_scales`): the int8 ones get names of their own
            twin = copy.deepcopy(donor)
            twin.input[:] = [f"{i}{INT8_SUFFIX}" if i in self.q8_init else i for i in donor.input]
            nodes.append(twin)
            for name in donor.input:
                if name in self.q8_init:
                    tensor = copy.deepcopy(self.q8_init[name])
                    tensor.name = f"{name}{INT8_SUFFIX}"
                    inits.append(tensor)
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        have = {t.name for t in model.graph.initializer}
        model.graph.initializer.extend(t for t in inits if t.name not in have)
        from vlmopt.quantization.fallback import _dead_code

        _dead_code(model)
        return model
