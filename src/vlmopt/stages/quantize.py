"""`vlmopt quantize`: fp16, INT8 (dynamic, calibrated static QDQ for CPU or TensorRT, blockwise weight-only) and INT4 variants.

Every mode is a thin layer over ONNX Runtime's own tools (`float16.convert_float_to_float16`,
`quantization.quantize_dynamic` / `quantize_static`, `MatMulNBitsQuantizer`); what vlmopt adds is the
choice of defaults (measured on real trained encoders, see the module constants and the README), calibration
data, the check of every variant against its fp32 parent on real data before it is committed, and, when that
check fails, the per-layer sensitivity that explains it and (`--fallback`) the fewest layers to keep in fp32
(`vlmopt.quantization.fallback`).

A model of parts (a generative VLM's vision, embedding and decoder) is quantized part by part, one mode
each (`--part decoder=int4 --part vision=int8`); the parts its family declares name their modes
(decoder int4/int8: MatMulNBits weight-only; vision fp16/int8; embedding int4/int8: the token table as
GatherBlockQuantized), and parts not named are copied unchanged. After every quantizer the operator counts
are checked: a quantizer that quantized nothing (ONNX Runtime's MatMulNBitsQuantizer silently skips an
8-bit Gather) fails the stage instead of passing the fp32 part off as quantized.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.markup import escape

from vlmopt import graph
from vlmopt.calibration import calibration_feeds, calibration_source, load_calibration, sample_count, synthetic_warning
from vlmopt.errors import CheckFailed, VlmoptError
from vlmopt.options import (
    StageOptions,
    calib_images_option,
    calib_samples_option,
    calib_text_option,
    eval_images_option,
    eval_text_option,
    fallback_budget_option,
    fallback_option,
    fallback_seconds_option,
    max_ppl_increase_option,
    min_agreement_option,
    min_cosine_option,
    min_token_agreement_option,
    name_option,
    option,
    source_option,
)
from vlmopt.quantization.accuracy import summary
from vlmopt.quantization.fallback import check_budget
from vlmopt.quantization.int4 import DATA_AWARE, KEEP_PRECISIONS, METHODS
from vlmopt.quantization.outliers import LIMIT as OUTLIER_LIMIT
from vlmopt.quantization.outliers import RATIO as OUTLIER_RATIO
from vlmopt.quiet import quiet_onnxruntime_tools
from vlmopt.records import TowerRecord, Traits, Verification
from vlmopt.runners import OrtRunner
from vlmopt.stage import Accepts, Job, Made, Stage, provisional
from vlmopt.workspace import Artifact, StageOutput

MODES = ("fp16", "bf16", "int8-dynamic", "int8-static", "int8-weights", "int4")
INT8_MODES = ("int8-dynamic", "int8-static")
#: per-part modes beyond MODES: the token table as GatherBlockQuantized, unchanged
PART_MODES = ("gather-int8", "gather-int4", "fp32")
#: --prefill: the prompt decoder's form beside a low-bit decoder. int8-dynamic (MatMulInteger, int8 activations per
#: token, outlier channels fp32) runs Qwen2.5-VL-3B's widths' 310-position prefill in about half of int4
#: MatMulNBits' or fp32's time (README, "A prompt decoder beside the int4 one")
PREFILL_MODES = ("int8-dynamic", "int8-weights", "fp32")
#: the decoder modes a prompt decoder goes beside
PREFILL_DECODER_MODES = ("int4", "int8-weights")
#: what each mode must leave in the graph: (operator that must appear, what it quantizes)
QUANTIZED_OPS = {
    "int4": ("MatMulNBits", "MatMul"),
    "int8-weights": ("MatMulNBits", "MatMul"),
    "int8-dynamic": (("MatMulInteger", "DynamicQuantizeMatMul", "QAttention"), "MatMul"),
    "int8-static": ("QuantizeLinear", "MatMul/Gemm"),
    "gather-int4": ("GatherBlockQuantized", "Gather"),
    "gather-int8": ("GatherBlockQuantized", "Gather"),
}
#: modes whose graphs a fallback can splice back to fp32 layer by layer
FALLBACK_MODES = ("int8-dynamic", "int8-static", "int8-weights", "int4")
#: modes the fallback is on for unless --no-fallback (issue 23): the int8 ones; int4 asks for it
FALLBACK_DEFAULT_MODES = ("int8-dynamic", "int8-static", "int8-weights")
#: layers listed in a failure's sensitivity report
SENSITIVITY_SHOWN = 15
TARGETS = ("cpu", "tensorrt")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
#: Kept in fp32 by default in fp16 graphs: normalisation statistics and softmax sums overflow fp16's
#: 65504 on real activations (DESIGN.md: TensorRT's strongly typed builds need this in the graph).
FP16_KEEP_FP32 = ("LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization", "Softmax", "Pow", "ReduceMean", "ReduceSum", "ReduceL2")
#: Quantized by default on CPU. Not Conv: ONNX Runtime's ConvInteger took 29 of 87 ms of the int8 ViT-B/32
#: vision tower at batch 8 (profiled here); the fp32 patch embedding costs about 9 ms.
INT8_DYNAMIC_OPS = ("MatMul", "Attention")
INT8_STATIC_CPU_OPS = ("MatMul", "Gemm")
#: The only ops TensorRT's strongly typed builder takes as explicit Q/DQ in vlmopt's graphs
INT8_TENSORRT_OPS = ("MatMul", "Gemm")
DEFAULT_NAMES = {"fp16": "fp16", "bf16": "bf16", "int8-dynamic": "int8-dynamic", "int8-static": "int8-static", "int8-weights": "int8-weights", "int4": "int4"}
#: bits of the weight-only (MatMulNBits) modes
WEIGHT_BITS = {"int8-weights": 8, "int4": 4}
#: the cosine gate of every mode unless --min-cosine says otherwise (issue 23): real encoders are judged at 0.995
#: (issue 10's target). With the fallback on for int8 it is met, not refused: all-MiniLM-L6-v2 is 0.9905 and 39/40
#: retrieval fully int8, 0.9951 and 40/40 with 18 of 36 MatMuls kept fp32 (README); the tiny random-weight CLIP
#: of the tests meets it fully int8 in every int8 mode (text tower 0.9964-0.9994).
MIN_COSINE = 0.995


@dataclass
class QuantizeOptions(StageOptions):
    mode: str = option(
        "int8-dynamic",
        "fp16, int8-dynamic, int8-static, int8-weights (blockwise int8 weights, accurate) or int4 (bf16 is refused: no ONNX Runtime CPU kernels).",
        choices=MODES,
    )
    source: str = source_option("onnx", "the fp32 ONNX artifact to quantize (onnx, onnx-opt, ...)")
    name: str | None = name_option(None, "the mode, int8-static-trt for TensorRT")
    target: str = option("cpu", "cpu, or tensorrt: symmetric INT8 Q/DQ on MatMul/Gemm only, float bias.", choices=TARGETS)
    per_channel: bool = option(True, "INT8 weights with one scale per output channel (default), or one per tensor.", flag="--per-channel/--per-tensor")
    reduce_range: bool = option(False, "7-bit INT8 weights (always on for --target cpu where this CPU has no VNNI: its int8 sums saturate).")
    split_outliers: int = option(
        OUTLIER_LIMIT,
        f"int8-dynamic: per MatMul, up to this many input channels whose calibration range is over {OUTLIER_RATIO:g}x the median "
        "channel's are computed in fp32 beside the int8 MatMul (0: none).",
        minimum=0,
    )
    calib_images: str | None = calib_images_option("int8-static, int8-dynamic's outlier channels")
    calib_text: str | None = calib_text_option("int8-static, int8-dynamic's outlier channels")
    calib_samples: int = calib_samples_option()
    calib_method: str = option("minmax", "int8-static range estimation: minmax, entropy or percentile.", choices=CALIBRATION_METHODS)
    percentile: float = option(99.999, "Percentile for --calib-method percentile.", minimum=90.0, maximum=100.0, exclusive=("max",))
    part: list[str] = option(
        [], "Quantize one part: PART=MODE, repeatable (decoder=int4 vision=int8); parts not named are copied unchanged.", metavar="PART=MODE"
    )
    block_size: int = option(32, "int8-weights and int4: weights per quantization block (power of two, >= 16).", minimum=16)
    accuracy_level: int = option(4, "int8-weights and int4: MatMulNBits compute (0 fp32 ... 4 int8).", minimum=0, maximum=4)
    symmetric: bool = option(True, "int8-weights and int4: symmetric blocks; --asymmetric adds a zero point per block.", flag="--symmetric/--asymmetric")
    op_types: list[str] = option([], "Only quantize these op types (repeatable or comma-separated; e.g. MatMul,Gather also shrinks the embeddings).")
    exclude_op_types: list[str] = option([], "Never quantize these op types (fp16: keep them in fp32).")
    nodes: list[str] = option([], "Only quantize these nodes (by name).")
    exclude_nodes: list[str] = option([], "Never quantize these nodes (by name).")
    keep_io_types: bool = option(True, "fp16: keep graph inputs and outputs fp32.", flag="--keep-io-types/--fp16-io")
    fallback: bool | None = fallback_option(", ".join(FALLBACK_DEFAULT_MODES))
    fallback_budget: float | None = fallback_budget_option()
    fallback_seconds: float = fallback_seconds_option()
    method: str | None = option(
        None,
        "--part decoder=int4: how the int4 weights are chosen: rtn, gptq (calibrated), hqq, awq (NNCF, calibrated), grid (weights "
        "already on a 4-bit grid, a dequantized GGUF Q4_0/Q4_1, kept exactly; the rest 8-bit) or auto "
        "(each, scored on the gate's text; the best that passes). Default: grid where most of the decoder's matrices are on a "
        "4-bit grid, else rtn.",
        choices=METHODS,
    )
    fallback_precision: str = option(
        "int8", "--part decoder=int4 --fallback: what the kept matrices become, int8 (8-bit MatMulNBits) or fp32.", choices=KEEP_PRECISIONS
    )
    prefill: str | None = option(
        None,
        "With --part decoder=int4 (or int8): a second copy of the decoder in this form runs every prompt, the int4 one "
        "every decode step. int8-dynamic (MatMulInteger, int8 activations per token, outlier channels chosen on "
        "--calib-text or the built-in text kept fp32) is faster at prompt lengths; int8-weights, fp32 are the others. "
        "Gated on its own, with the same token gates.",
        choices=PREFILL_MODES,
    )
    min_cosine: float | None = min_cosine_option(MIN_COSINE)
    min_agreement: float | None = min_agreement_option(None)
    # measured on SmolLM2-135M (README): weight-only int8 0.955 and +0.7 %, int4 0.67 and +33 %
    min_token_agreement: float | None = min_token_agreement_option(0.90)
    max_ppl_increase: float | None = max_ppl_increase_option(0.05)

    @property
    def parts(self) -> dict[str, str]:
        """--part as {part: mode}, in the order given."""
        return part_modes(self.part)

    eval_images: str | None = eval_images_option()
    eval_text: str | None = eval_text_option()

    @property
    def artifact(self) -> str:
        if self.name:
            return self.name
        if self.part:
            return "_".join([*(f"{name}-{mode}" for name, mode in self.parts.items()), *([f"prefill-{self.prefill}"] if self.prefill else [])])
        return "int8-static-trt" if self.mode == "int8-static" and self.target == "tensorrt" else DEFAULT_NAMES.get(self.mode, self.mode)

    def check(self) -> None:
        if self.part:
            self.parts  # noqa: B018 - refuses a malformed --part
            if self.mode != "int8-dynamic":
                raise VlmoptError("--mode sets one mode for every tower and --part one per part; use one of them")
            if self.target != "cpu":
                raise VlmoptError("--part makes CPU variants; drop --target")
            if self.fallback and "int4" not in self.parts.values():
                raise VlmoptError("--fallback with --part keeps the most sensitive matrices of a decoder=int4 part at int8 or fp32; name one")
        if self.prefill is not None:
            if not self.part:
                raise VlmoptError("--prefill adds a prompt decoder beside a low-bit decoder part; give it with --part decoder=int4 (or int8)")
            if self.fallback:
                raise VlmoptError("--fallback searches the decoder's int4 matrices and cannot mend a prompt decoder; make them in two runs, or drop --prefill")
        decoder_int4 = bool(self.part) and "int4" in self.parts.values()
        if self.method not in (None, "rtn") and not decoder_int4:
            raise VlmoptError(f"--method {self.method} chooses a decoder's int4 weights; use it with --part decoder=int4")
        if self.fallback_precision != "int8" and not (decoder_int4 and self.fallback):
            raise VlmoptError("--fallback-precision applies to --part decoder=int4 --fallback")
        prompt_calibrated = self.prefill == "int8-dynamic" and self.split_outliers > 0
        if (
            decoder_int4
            and (self.calib_text or self.calib_images)
            and self.mode != "int8-static"
            and (self.calib_images or (self.method not in DATA_AWARE and not prompt_calibrated))
        ):
            raise VlmoptError(
                f"--method {self.method or 'rtn or grid (the default)'} reads no calibration data; --calib-text calibrates --method "
                f"{', '.join(DATA_AWARE)} and --prefill int8-dynamic's outlier channels (text only)"
            )
        if self.mode == "bf16":
            raise VlmoptError(
                "--mode bf16 is not available: ONNX Runtime's CPU provider has no bf16 MatMul/Add kernels, so a bf16 graph "
                "cannot be verified here, and ONNX Runtime ships no bf16 converter; use --mode fp16"
            )
        if self.target == "tensorrt" and self.mode not in ("int8-static", "fp16"):
            raise VlmoptError(f"--target tensorrt applies to int8-static and fp16; {self.mode} makes ONNX Runtime-only operators")
        outliers = self.mode == "int8-dynamic" and self.split_outliers > 0 and not self.part
        if self.mode != "int8-static" and (
            self.calib_method != "minmax" or ((self.calib_images or (self.calib_text and not decoder_int4 and not prompt_calibrated)) and not outliers)
        ):
            raise VlmoptError(
                "--calib-images, --calib-text and --calib-method calibrate int8-static (--calib-images/--calib-text also choose "
                f"int8-dynamic's outlier channels); drop them for {self.mode if not self.part else '--part'} "
                "(--eval-images/--eval-text verify any mode on your data)"
            )
        if self.split_outliers != OUTLIER_LIMIT and self.mode != "int8-dynamic":
            raise VlmoptError(f"--split-outliers applies to int8-dynamic, not {self.mode}")
        if self.block_size & (self.block_size - 1):
            raise VlmoptError(f"--block-size must be a power of two of at least 16, got {self.block_size}")
        if (not self.per_channel or self.reduce_range) and self.mode not in INT8_MODES:
            raise VlmoptError(f"--per-tensor and --reduce-range apply to int8-dynamic and int8-static, not {self.mode}")
        if self.fallback and self.mode not in FALLBACK_MODES:
            raise VlmoptError(f"--fallback applies to {', '.join(FALLBACK_MODES)}, not {self.mode}")
        if self.fallback_budget is not None and self.fallback is None and not self.accuracy_aware:
            raise VlmoptError(f"--fallback-budget bounds the fallback, and {self.mode} has none by default; add --fallback or drop it")
        check_budget(self.accuracy_aware, self.fallback_budget)
        if self.fallback and self.min_cosine is None:
            raise VlmoptError("--fallback searches for the fewest layers that meet --min-cosine; give a threshold, or --no-fallback with --min-cosine off")
        if self.mode == "fp16" and self.op_types:
            raise VlmoptError("fp16 converts every op it can; keep some in fp32 with --exclude-op-types or --exclude-nodes instead of --op-types")
        if self.target == "tensorrt" and self.op_types and set(self.op_types) - set(INT8_TENSORRT_OPS):
            extra = sorted(set(self.op_types) - set(INT8_TENSORRT_OPS))
            raise VlmoptError(f"--target tensorrt quantizes only {', '.join(INT8_TENSORRT_OPS)}; drop {', '.join(extra)} from --op-types")
        overlap = set(self.op_types) & set(self.exclude_op_types) or set(self.nodes) & set(self.exclude_nodes)
        if overlap:
            raise VlmoptError(f"{', '.join(sorted(overlap))} is both included and excluded")

    @property
    def accuracy_aware(self) -> bool:
        """Whether the fallback runs: --fallback/--no-fallback as given, else on for FALLBACK_DEFAULT_MODES (not for --part)."""
        if self.fallback is not None:
            return self.fallback
        return self.mode in FALLBACK_DEFAULT_MODES and not self.part and self.min_cosine is not None


def part_modes(items: list[str]) -> dict[str, str]:
    """--part PART=MODE items as {part: mode}, in the order given; a malformed or repeated one refused."""
    parts: dict[str, str] = {}
    for item in items:
        name, sep, mode = item.partition("=")
        if not sep or not name.strip() or not mode.strip():
            raise VlmoptError(f"--part takes PART=MODE (decoder=int4), got '{item}'")
        if name.strip() in parts:
            raise VlmoptError(f"--part names {name.strip()} twice")
        parts[name.strip()] = mode.strip()
    return parts


# -- the modes -------------------------------------------------------------------------------
def to_fp16(source: Path, destination: Path, options: QuantizeOptions) -> dict[str, Any]:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    keep = sorted(set(FP16_KEEP_FP32) | set(options.exclude_op_types))
    model = graph.load(source)
    del model.graph.value_info[:]
    model = convert_float_to_float16(model, keep_io_types=options.keep_io_types, op_block_list=keep, node_block_list=options.exclude_nodes or None)
    _unique_node_names(model)
    graph.save(model, destination)
    return {"kept_fp32_ops": keep, "kept_fp32_nodes": options.exclude_nodes}


def _unique_node_names(model: Any) -> None:
    """The fp16 converter casts an initializer shared by two blocked nodes (fused graphs) twice, into one
    tensor under one name: drop the exact repeats, then make any remaining names unique."""
    nodes, seen_nodes = [], set()
    for node in model.graph.node:
        key = (node.op_type, node.domain, tuple(node.input), tuple(node.output), tuple(a.SerializeToString() for a in node.attribute))
        if node.op_type == "Cast" and key in seen_nodes:
            continue
        seen_nodes.add(key)
        nodes.append(node)
    if len(nodes) != len(model.graph.node):
        kept = [type(n)() for n in nodes]
        for copy, node in zip(kept, nodes, strict=True):
            copy.CopyFrom(node)
        del model.graph.node[:]
        model.graph.node.extend(kept)
    names: dict[str, int] = {}
    for node in model.graph.node:
        if node.name in names:
            names[node.name] += 1
            node.name = f"{node.name}_{names[node.name]}"
        else:
            names[node.name] = 0


def _biased_attention(source: Path) -> list[str]:
    """Fused Attention nodes with an attention bias (CLIP text's causal mask): ORT's QAttention drops that input."""
    import onnx

    model = onnx.load(str(source), load_external_data=False)
    return [n.name for n in model.graph.node if n.op_type == "Attention" and len(n.input) > 5 and n.input[5]]


def _reduce_range(options: QuantizeOptions) -> tuple[bool, str | None]:
    """7-bit weights where asked, and for the CPU wherever this CPU's int8 sums saturate: verification runs here,
    and an 8-bit variant that verifies on a VNNI CPU loses accuracy on this one (`machine.int8_sums_saturate`)."""
    from vlmopt.machine import int8_sums_saturate

    if options.reduce_range:
        return True, "asked (--reduce-range)"
    if options.target == "cpu" and int8_sums_saturate():
        return True, "this CPU has no VNNI: 8-bit weights saturate ONNX Runtime's int16 sums here"
    return False, None


def int8_dynamic(
    source: Path, destination: Path, options: QuantizeOptions, feeds: list[dict[str, np.ndarray]] | None = None, per_token: bool = False
) -> dict[str, Any]:
    """`quantize_dynamic`; with calibration `feeds`, the outlier input channels of each MatMul first split out into fp32
    (`vlmopt.quantization.outliers`); `per_token`: the MatMuls' activations with one scale per token, not per tensor
    (`vlmopt.quantization.per_token`: a decoder's prompt graph)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    op_types = _op_types(options, INT8_DYNAMIC_OPS)
    kept = _biased_attention(source) if "Attention" in op_types else []
    reduce_range, why = _reduce_range(options)
    edit = _outlier_split(options, feeds)
    with _prepared(source, edit or _no_edit) as (prepared, split):
        quantize_dynamic(
            prepared,
            destination,
            weight_type=QuantType.QInt8,
            per_channel=options.per_channel,
            reduce_range=reduce_range,
            op_types_to_quantize=op_types,
            nodes_to_quantize=options.nodes or None,
            nodes_to_exclude=[*options.exclude_nodes, *kept, *(split.fp32_nodes if split else [])] or None,
            use_external_data_format=_large(source),
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    rewritten = _per_token(destination) if per_token else []
    weights = ("int7" if reduce_range else "int8") + (" per channel" if options.per_channel else " per tensor")
    return {
        "op_types": op_types,
        "weights": weights,
        "activations": f"int8 symmetric, shifted to uint8 (dynamic, per token: {len(rewritten)} inputs)" if per_token else "uint8 (dynamic, per tensor)",
        "kept_fp32_attention_with_bias": kept,
        **({"reduce_range": why} if reduce_range else {}),
        **({"outlier_channels": split.to_json(OUTLIER_RATIO, options.split_outliers, "real calibration data")} if split else {}),
    }


def _per_token(path: Path) -> list[str]:
    """Rewrite a dynamic-int8 graph's activation quantizers to one scale per token, in place (weights untouched)."""
    import onnx

    from vlmopt.quantization import per_token

    model = onnx.load(str(path), load_external_data=False)
    rewritten = per_token.rewrite(model)
    onnx.save(model, str(path))
    return rewritten


def _no_edit(model: Any) -> None:
    return None


def _outlier_split(options: QuantizeOptions, feeds: list[dict[str, np.ndarray]] | None) -> Any:
    """A graph edit for `_prepared`: the outlier channels split out, chosen on `feeds` (none without feeds or with
    --split-outliers 0)."""
    if not feeds or options.split_outliers <= 0 or "MatMul" not in _op_types(options, INT8_DYNAMIC_OPS):
        return None
    from vlmopt.quantization import outliers

    def edit(model: Any) -> Any:
        chosen = {n.name for n in outliers.weighted_matmuls(model) if (not options.nodes or n.name in options.nodes) and n.name not in options.exclude_nodes}
        ranges = outliers.channel_ranges(model, feeds)
        return outliers.split(model, ranges, OUTLIER_RATIO, options.split_outliers, chosen)

    return edit


def int8_static(source: Path, destination: Path, options: QuantizeOptions, feeds: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    tensorrt = options.target == "tensorrt"
    op_types = _op_types(options, INT8_TENSORRT_OPS if tensorrt else INT8_STATIC_CPU_OPS)
    # Q/DQ on the inputs of the quantized ops only: their outputs stay float, so the embeddings are not
    # rounded to 256 levels and ORT's CPU fusions cannot turn an asymmetric output DQ into a lossy chain.
    extra: dict[str, Any] = {"DefaultTensorType": onnx.TensorProto.FLOAT, "OpTypesToExcludeOutputQuantization": op_types}
    if tensorrt:
        # TensorRT takes symmetric INT8 Q/DQ with zero zero-points and a float bias.
        extra.update(ActivationSymmetric=True, WeightSymmetric=True, QuantizeBias=False)
    if options.calib_method == "percentile":
        extra["CalibPercentile"] = options.percentile
    reduce_range, why = _reduce_range(options)
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}[options.calib_method]
    with _prepared(source) as prepared, tempfile.TemporaryDirectory(prefix="vlmopt-calibration-") as scratch:
        cache = None
        if options.calib_method in ("entropy", "percentile"):
            cache = _histogram_ranges(prepared, op_types, feeds, Path(scratch), options, symmetric=tensorrt)
        quantize_static(
            prepared,
            destination,
            _FeedReader(feeds),
            calibration_cache_path=cache,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=op_types,
            per_channel=options.per_channel,
            reduce_range=reduce_range,
            activation_type=QuantType.QInt8 if tensorrt else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=options.nodes or None,
            nodes_to_exclude=options.exclude_nodes or None,
            calibrate_method=method,
            use_external_data_format=_large(source),
            extra_options=extra,
        )
    activations = "int8 symmetric" if tensorrt else "uint8 asymmetric"
    weights = ("int7" if reduce_range else "int8") + " symmetric " + ("per channel" if options.per_channel else "per tensor")
    return {
        "op_types": op_types,
        "format": "QDQ",
        "weights": weights,
        "activations": activations,
        "bias": "fp32" if tensorrt else "int32",
        **({"reduce_range": why} if reduce_range else {}),
    }


def _histogram_ranges(model: Path, op_types: list[str], feeds: list[dict[str, np.ndarray]], scratch: Path, options: QuantizeOptions, symmetric: bool) -> Path:
    """Entropy (KL divergence) or percentile ranges over a 2048-bin histogram, saved as a calibration cache for
    `quantize_static`.

    `quantize_static` builds its entropy calibrator with 128 bins and 128 quantized bins, which leaves one
    candidate threshold, the full range: exactly minmax. ONNX Runtime's own calibrator with TensorRT's
    histogram size (2048 bins) gives real entropy thresholds. The histograms take one feed at a time: real
    calibration batches differ in length, and ONNX Runtime's histogram collector stacks everything one
    `collect_data` call saw into one array (it fails on unequal shapes); its histograms merge across calls.
    """
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator, save_tensors_data

    method = CalibrationMethod.Entropy if options.calib_method == "entropy" else CalibrationMethod.Percentile
    extra: dict[str, Any] = {"num_bins": 2048, "symmetric": symmetric}
    extra.update({"num_quantized_bins": 128} if method == CalibrationMethod.Entropy else {"percentile": options.percentile})
    calibrator = create_calibrator(
        model,
        op_types,
        augmented_model_path=str(scratch / "augmented.onnx"),
        calibrate_method=method,
        use_external_data_format=_large(model),
        extra_options=extra,
    )
    for feed in feeds:
        calibrator.collect_data(_FeedReader([feed]))
    ranges = calibrator.compute_data()
    del calibrator
    cache = scratch / "ranges.json"
    save_tensors_data(ranges, cache)
    return cache


def weight_only(source: Path, destination: Path, options: QuantizeOptions, bits: int | None = None) -> dict[str, Any]:
    """int4 and int8-weights: MatMulNBits, blocks of --block-size weights (a decoder part's int4/int8 too). With accuracy
    level 4 the activations are quantized to int8 per row and per block at run time: fine-grained enough for the
    activation outliers of trained transformers (all-MiniLM-L6-v2 0.998, all-mpnet-base-v2 0.9993 cosine min with int8
    weights; SmolLM2-135M +0.65 % perplexity with int8 weights, README)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    bits = bits or WEIGHT_BITS[options.mode]

    op_types = tuple(_op_types(options, ("MatMul",)))
    model = graph.load(source)
    del model.graph.value_info[:]
    exclude = list(options.exclude_nodes)
    if options.nodes:
        # MatMulNBitsQuantizer adds `nodes_to_include` to the op types instead of restricting to them
        exclude += [n.name for n in model.graph.node if n.op_type in op_types and n.name not in options.nodes]
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=bits,
        block_size=options.block_size,
        is_symmetric=options.symmetric,
        accuracy_level=options.accuracy_level,
        nodes_to_exclude=exclude or None,
        op_types_to_quantize=op_types,
    )
    quantizer.process()
    graph.save(quantizer.model.model, destination)
    kind = "symmetric" if options.symmetric else "asymmetric"
    return {"op_types": list(op_types), "weights": f"int{bits} {kind}, blocks of {options.block_size}", "accuracy_level": options.accuracy_level}


def gather_int4(source: Path, destination: Path, options: QuantizeOptions) -> dict[str, Any]:
    """The token table (Gather) as GatherBlockQuantized, 4 bits in blocks along the hidden axis (MatMulNBitsQuantizer)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = graph.load(source)
    del model.graph.value_info[:]
    quantizer = MatMulNBitsQuantizer(
        model, bits=4, block_size=options.block_size, is_symmetric=options.symmetric, op_types_to_quantize=("Gather",), quant_axes=(("Gather", 1),)
    )
    quantizer.process()
    graph.save(quantizer.model.model, destination)
    return {
        "op_types": ["Gather"],
        "weights": f"int4 {'symmetric' if options.symmetric else 'asymmetric'}, blocks of {options.block_size} along the hidden axis",
    }


def gather_int8(source: Path, destination: Path, options: QuantizeOptions) -> dict[str, Any]:
    """The token table as 8-bit GatherBlockQuantized: symmetric blocks along the hidden axis, written here because
    MatMulNBitsQuantizer leaves an 8-bit Gather unquantized without a word (ONNX Runtime 1.31)."""
    import onnx
    from onnx import helper, numpy_helper

    model = graph.load(source)
    del model.graph.value_info[:]
    tables = {t.name: t for t in model.graph.initializer}
    block = options.block_size
    done = []
    for node in model.graph.node:
        table = tables.get(node.input[0]) if node.op_type == "Gather" and node.domain in ("", "ai.onnx") else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if table is None or len(table.dims) != 2 or axis != 0 or table.dims[1] % block:
            continue
        weights = numpy_helper.to_array(table).astype(np.float32)
        blocks = weights.reshape(weights.shape[0], -1, block)
        scales = np.maximum(np.abs(blocks).max(-1), 1e-12) / 127.0
        codes = (np.clip(np.round(blocks / scales[..., None]), -127, 127).astype(np.int16) + 128).astype(np.uint8).reshape(weights.shape)
        name = table.name
        model.graph.initializer.remove(table)
        model.graph.initializer.extend([numpy_helper.from_array(codes, f"{name}_Q8"), numpy_helper.from_array(scales.astype(np.float32), f"{name}_scales")])
        replacement = helper.make_node(
            "GatherBlockQuantized",
            [f"{name}_Q8", node.input[1], f"{name}_scales"],
            list(node.output),
            name=f"{node.name}_Q8",
            domain="com.microsoft",
            bits=8,
            block_size=block,
            gather_axis=0,
            quantize_axis=1,
        )
        node.CopyFrom(replacement)
        done.append(name)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    graph.save(model, destination)
    return {"op_types": ["Gather"], "weights": f"int8 symmetric, blocks of {block} along the hidden axis", "tables": done}


def _prefill_file(decoder_file: str) -> str:
    """`decoder.onnx` -> `decoder_prefill.onnx`: the prompt decoder's file beside its decoder's."""
    stem, dot, suffix = decoder_file.rpartition(".")
    return f"{stem}_prefill.{suffix}" if dot else f"{decoder_file}_prefill"


def copy_part(source: Path, destination: Path) -> dict[str, Any]:
    """A part left as it is: its files copied (each artifact folder stands alone)."""
    for path in graph.tower_files(source.parent, source.name):
        shutil.copyfile(path, destination.parent / path.name)
    return {"copied": "unchanged from the parent"}


def tower_modes(options: QuantizeOptions, towers: dict[str, Any]) -> dict[str, str]:
    """The mode each tower gets: --mode for all, or --part per part (modes a family declares for its parts, by their short names)."""
    declared = {name: tower.meta.get("quantize") for name, tower in towers.items()}
    if not options.part:
        if any(declared.values()):
            parts = ", ".join(f"{name} ({'/'.join(modes)})" for name, modes in declared.items() if modes)
            raise VlmoptError(f"this model is quantized part by part: give --part PART=MODE for any of {parts}, e.g. --part decoder=int4 --part vision=int8")
        return {name: options.mode for name in towers}
    parts = options.parts
    unknown = [name for name in parts if name not in towers]
    if unknown:
        raise VlmoptError(f"no part named {', '.join(unknown)}; the parts are {', '.join(towers)}")
    modes = {}
    for name in towers:
        mode = parts.get(name, "fp32")
        offered = declared[name] or {m: m for m in MODES if m != "bf16"}
        if mode != "fp32" and mode not in offered:
            raise VlmoptError(f"--part {name}={mode}: the {name} part takes {', '.join(['fp32', *offered])}")
        modes[name] = "fp32" if mode == "fp32" else offered[mode]
    if set(modes.values()) == {"fp32"}:
        raise VlmoptError("--part leaves every part fp32; name a mode for at least one part (decoder=int4)")
    return modes


def copy_runtime_files(parent_dir: Path, parent: Artifact, folder: Path) -> list[str]:
    """What the parent keeps beside its graphs (processor files, genai_config.json), so the variant runs where the parent does."""
    graphs = {f.path for name in parent.towers for f in parent.tower_files(name)}
    copied = []
    for record in parent.files:
        if record.path not in graphs and "/" not in record.path:
            shutil.copyfile(parent_dir / record.path, folder / record.path)
            copied.append(record.path)
    return copied


def check_quantized(tower: str, mode: str, before: dict[str, int], after: dict[str, int]) -> None:
    """Refuse a result in which the mode's quantizer quantized nothing (it would pass the fp32 part off as quantized)."""
    if mode not in QUANTIZED_OPS:
        return
    made, target = QUANTIZED_OPS[mode]
    made = made if isinstance(made, tuple) else (made,)
    if not any(after.get(op, 0) > before.get(op, 0) for op in made):
        raise CheckFailed(
            f"the {tower} tower: {mode} quantized no {target} operator ({', '.join(made)} count unchanged: "
            f"{', '.join(f'{op} {after.get(op, 0)}' for op in made)}); nothing was written"
        )


def _op_types(options: QuantizeOptions, defaults: tuple[str, ...]) -> list[str]:
    chosen = [op for op in options.op_types or list(defaults) if op not in options.exclude_op_types]
    if not chosen:
        # ONNX Runtime reads an empty list as "every op type"
        raise VlmoptError(f"--exclude-op-types leaves nothing for {options.mode} to quantize (it quantizes {', '.join(options.op_types or defaults)})")
    return chosen


def _large(path: Path) -> bool:
    return graph.weight_bytes(path.parent, path.name) > graph.EXTERNAL_DATA_BYTES


@contextlib.contextmanager
def _prepared(source: Path, edit: Any = None):
    """The source without recorded value_info: ORT's quantizers fail on dynamo exports' shapes otherwise (DESIGN.md).
    With `edit` (a function of the model, editing it in place), it yields (path, what edit returned)."""
    model = graph.load(source)
    del model.graph.value_info[:]
    edited = edit(model) if edit is not None else None
    with tempfile.TemporaryDirectory(prefix="vlmopt-quantize-") as folder:
        path = Path(folder) / source.name
        graph.save(model, path)
        del model
        yield (path, edited) if edit is not None else path


class _FeedReader:
    """ONNX Runtime's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._feeds = feeds
        self._iter = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self._feeds)

    def __iter__(self):
        return iter(self._feeds)

    def __len__(self) -> int:
        return len(self._feeds)


# -- the stage -------------------------------------------------------------------------------
class Quantize(Stage):
    name = "quantize"
    Options = QuantizeOptions
    produces = "onnx"
    accepts = Accepts(kinds=("onnx",), precisions=("fp32",), hint="quantize an fp32 artifact such as 'onnx' or 'onnx-opt' (run `vlmopt convert` first)")
    tools = ("onnxruntime", "onnx")
    summary = "Make an fp16, INT8 or INT4 variant of an fp32 ONNX artifact and verify it against that artifact on real data."
    details = (
        "Fails with exit 1, writing nothing, when the cosine or top-1 agreement falls below the thresholds, and names the most\n"
        "sensitive layers; --fallback keeps the fewest of them in fp32 until the gate passes.\n"
        "Example: vlmopt quantize build/clip --mode int8-static --calib-images photos/ --calib-text prompts.txt"
    )

    def artifact_name(self, options: QuantizeOptions) -> str:
        return options.artifact

    def check_parent(self, parent: Artifact, options: QuantizeOptions) -> None:
        super().check_parent(parent, options)
        if options.mode == "fp16" and parent.traits.fused:
            raise VlmoptError(
                f"fp16 reads an unfused export: ONNX Runtime's fp16 converter leaves the fused SkipLayerNormalization of '{parent.name}' "
                "with mixed fp16/fp32 inputs; use --from onnx (ONNX Runtime and TensorRT fuse the fp16 graph themselves)"
            )
        if options.target == "tensorrt" and parent.traits.ort_only_ops:
            raise VlmoptError(
                f"'{parent.name}' holds ONNX Runtime-only operators ({', '.join(parent.traits.ort_only_ops)}) that TensorRT cannot parse; "
                "quantize the plain export ('onnx') for --target tensorrt"
            )

    def prepare(self, job: Job) -> None:
        options: QuantizeOptions = job.options
        modes = tower_modes(options, job.towers)
        job.state["modes"] = modes
        self._prepare_decoders(job, modes)
        job.state["prefill"] = self._prompt_decoders(job, modes)
        calibrated = ("int8-static",) + (("int8-dynamic",) if options.split_outliers > 0 and not options.part else ())
        if set(calibrated) & set(modes.values()):
            chosen = {name: tower for name, tower in job.towers.items() if modes[name] in calibrated}
            job.state["calibration_data"] = load_calibration(
                job.model_dir, chosen, options.calib_images, options.calib_text, options.calib_samples, builtin=True
            )
        job.state["calibration"] = {}

    def make_tower(self, job: Job, tower: str, tmp: Path) -> Made:
        options: QuantizeOptions = job.options
        mode = job.state["modes"][tower]
        file = job.parent.towers[tower].file
        source, destination = job.parent_file(tower), tmp / file
        job.say(f"{mode}: the {tower} tower")
        with quiet_onnxruntime_tools(job.context.debug):
            if mode == "fp32":
                details = copy_part(source, destination)
            elif mode == "fp16":
                details = to_fp16(source, destination, options)
            elif mode == "int8-dynamic":
                details = int8_dynamic(source, destination, options, self._outlier_feeds(job, tower))
            elif mode == "int8-static":
                details = int8_static(source, destination, options, self._calibration(job, tower))
            elif mode == "int4" and tower in job.state["decoders"]:
                details = self._decoder_int4(job, tower, source, destination)
            elif mode in ("int4", "int8-weights"):
                details = weight_only(source, destination, options, bits=WEIGHT_BITS[mode])
            elif mode == "gather-int4":
                details = gather_int4(source, destination, options)
            else:
                details = gather_int8(source, destination, options)
            if options.part:  # a part's mode must quantize it; with --mode, --nodes/--op-types may rightly leave a tower untouched
                check_quantized(tower, mode, graph.op_counts(graph.load_structure(source)), graph.op_counts(graph.load_structure(destination)))
            prefill = self._prompt_decoder(job, tower, source, tmp) if tower in job.state["prefill"] else None
        work = {"mode": mode, "quantization": details, "parent_size": graph.weight_bytes(job.parent_dir, file)}
        work.update(self._graph_facts(destination))
        if prefill is not None:
            work["prefill"] = prefill
        return Made(TowerRecord(job.towers[tower], file, graph.weight_bytes(tmp, file), prefill=prefill["file"] if prefill else None), work)

    def _prompt_decoders(self, job: Job, modes: dict[str, str]) -> list[str]:
        """The decoder parts that get a prompt decoder (--prefill): each low-bit decoder with a self-attention cache."""
        from vlmopt.families import family_named
        from vlmopt.families.base import kv_contract
        from vlmopt.families.generative import SELF_ATTENTION

        options: QuantizeOptions = job.options
        if options.prefill is None:
            return []
        decoders = [name for name, mode in modes.items() if mode in PREFILL_DECODER_MODES and kv_contract(job.towers[name]) is not None]
        if not decoders:
            named = ", ".join(f"{name}={mode}" for name, mode in options.parts.items())
            raise VlmoptError(f"--prefill goes beside a decoder part (a KV cache) quantized to int4 or int8; --part names {named}")
        family = family_named(job.parent.traits.family)
        contract = getattr(family, "contract", None)
        if contract is None or contract.cache != SELF_ATTENTION:
            raise VlmoptError(f"--prefill runs in vlmopt's decoder-only loop; {job.parent.traits.family}'s decoder has a cross-attention cache")
        same = [name for name in decoders if modes[name] == options.prefill]
        if same:
            raise VlmoptError(
                f"--prefill {options.prefill} is the {same[0]} part's own form; a prompt decoder must differ from it (int8-dynamic is the fast one)"
            )
        return decoders

    def _prompt_decoder(self, job: Job, tower: str, source: Path, tmp: Path) -> dict[str, Any]:
        """The decoder's prompt graph (--prefill) from the parent's fp32 decoder, beside the decoder's own file."""
        options: QuantizeOptions = job.options
        file = _prefill_file(job.parent.towers[tower].file or f"{tower}.onnx")
        destination = tmp / file
        job.say(f"{options.prefill}: the {tower} part's prompt decoder ({file})")
        if options.prefill == "int8-dynamic":
            feeds, calibration = self._prompt_calibration(job, source) if options.split_outliers > 0 else (None, None)
            details = int8_dynamic(source, destination, options, feeds, per_token=True)
            if calibration is not None and "outlier_channels" in details:
                details["outlier_channels"]["data"] = calibration["source"]
            if calibration is not None:
                details["calibration"] = calibration
        elif options.prefill == "int8-weights":
            details = weight_only(source, destination, options, bits=WEIGHT_BITS["int8-weights"])
        else:
            graph.save(graph.load(source), destination)
            details = {"copied": "unchanged from the parent"}
        check_quantized(f"{tower} prompt", options.prefill, graph.op_counts(graph.load_structure(source)), graph.op_counts(graph.load_structure(destination)))
        return {"file": file, "mode": options.prefill, "quantization": details, "size": graph.weight_bytes(tmp, file)}

    def _prompt_calibration(self, job: Job, source: Path) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
        """The prompt decoder's calibration feeds: windows of real text (--calib-text, or the built-in text the gate
        does not read) through the parent's embedding part, each one prefill; they choose its outlier channels."""
        from vlmopt.quantization import int4
        from vlmopt.runners.generate import ort_session

        options: QuantizeOptions = job.options
        calib = job.state.get("calib_text") or int4.calibration_text(self._preprocessor(job).tokenizer, options.calib_text, options.calib_samples)
        job.say(f"the prompt decoder's outlier channels: {len(calib.windows)} windows of {int4.CALIB_WINDOW} tokens of {calib.source}")
        threads = job.context.thread_count
        embedding = ort_session(job.parent_file(self._part_producing(job, "inputs_embeds")), threads)
        feeds = int4.decoder_feeds(embedding, ort_session(source, threads), calib.windows)
        return feeds, calib.to_json()

    @staticmethod
    def _graph_facts(path: Path) -> dict[str, Any]:
        model = graph.load(path)
        domains = graph.custom_domains(model)
        return {"op_counts": graph.op_counts(model), "ort_only_ops": domains, "tensorrt_issue": tensorrt_ready(model, domains)[1]}

    def build(self, job: Job, tmp: Path) -> StageOutput:
        """Each tower quantized, then verified; a missed cosine gate is explained by the per-layer sensitivity and,
        with --fallback, met by keeping the fewest most sensitive layers in fp32."""
        options: QuantizeOptions = job.options
        copied = copy_runtime_files(job.parent_dir, job.parent, tmp)  # processor files, genai_config.json: the variant runs where its parent does
        made = {name: self.make_tower(job, name, tmp) for name in job.towers}
        towers = {name: m.tower for name, m in made.items()}
        job.state["fallback"] = {"needed": False} if options.accuracy_aware else None
        try:
            verification = self.verify(job, tmp, towers)
        except CheckFailed as failed:
            if options.part and options.fallback and _token_gates_failed(failed):
                verification = self._decoder_fallback(job, tmp, made, failed)
            elif options.part and job.state.get("decoder_int4") and _token_gates_failed(failed):
                self._decoder_sensitivity(job, failed)
            elif options.part or options.mode not in FALLBACK_MODES or "verification" not in failed.details:
                raise
            else:
                verification = self._accuracy_aware(job, tmp, made, failed)
        record = self.record(job, made)
        if copied:
            record["runtime_files"] = copied
        return StageOutput(towers=towers, traits=self.traits(job, made), record=record, verification=verification)

    def _accuracy_aware(self, job: Job, tmp: Path, made: dict[str, Made], failed: CheckFailed) -> Verification:
        """A missed cosine gate: the per-layer sensitivity explains it, and the fallback (on by default for the int8 modes,
        `vlmopt.quantization.accuracy`) keeps the fewest most sensitive layers in fp32 until it passes."""
        from vlmopt.quantization import accuracy, fallback

        options: QuantizeOptions = job.options
        verification = Verification.from_json(failed.details["verification"])
        missed = [t for t, checks in verification.towers.items() if any(not o.passed for c in checks if c.gated for o in c.outputs.values())]
        threads = job.context.thread_count
        backends = {
            tower: fallback.SpliceBackend(fallback.Splicer(_fp32_graph(job.parent_file(tower)), graph.load(tmp / made[tower].tower.file)), threads)
            for tower in missed or list(made)
        }
        if not options.accuracy_aware or not missed:
            report = {}
            for tower, backend in backends.items():
                job.say(f"ranking the {tower} tower's layers by sensitivity")
                report[tower] = _sensitivity_json(backend.splicer, backend.ranking(self._gate_feeds(job, tower)))
            hint = "drop --no-fallback (the fallback is on by default for int8) to keep the fewest of them in fp32, or try --mode int8-weights"
            if options.mode not in FALLBACK_DEFAULT_MODES:
                hint = "rerun with --fallback to keep the fewest of them in fp32 until the gate passes, or try --mode int8-weights"
            if options.accuracy_aware:
                hint = "the fallback meets a --min-cosine gate only"
            raise CheckFailed(
                f"{failed.message.removesuffix('; nothing was written')}; {_sensitivity_line(report)}; {hint}; nothing was written",
                details={**failed.details, "report": {"sensitivity": report}},
            )
        assert options.min_cosine is not None
        outcomes: dict[str, accuracy.TowerFallback] = {}
        for tower in missed:
            with OrtRunner(job.parent_file(tower), threads=threads) as parent:
                outcomes[tower] = accuracy.run(
                    tower,
                    backends[tower],
                    self._gate_feeds(job, tower),
                    lambda feed, runner=parent: {k: np.array(v, copy=True) for k, v in runner.run(feed).items()},
                    options.min_cosine,
                    options.fallback_budget,
                    options.fallback_seconds,
                    job.say,
                    fixed_batch=isinstance(job.towers[tower].inputs[0].shape[0], int),
                    fixed_sequence=any(isinstance(d, int) for spec in job.towers[tower].inputs if spec.role == "input_ids" for d in spec.shape[1:]),
                )
        record: dict[str, Any] = {
            "needed": any(o.needed for o in outcomes.values()),
            "gate": {"min_cosine": options.min_cosine, "data": "the gated real data: searched on even rows, judged on odd ones"},
            "towers": {tower: o.to_json() for tower, o in outcomes.items()},
        }
        short = {t: o for t, o in outcomes.items() if not o.passed}
        if short:
            report = {t: o.top_sensitive for t, o in outcomes.items()}
            raise CheckFailed(
                "; ".join(accuracy.failure(t, o, options.min_cosine, options.mode) for t, o in short.items())
                + f"; {_sensitivity_line(report)}; nothing was written",
                details={**failed.details, "report": {"sensitivity": report}, "fallback": record},
            )
        for tower, outcome in outcomes.items():
            file = made[tower].tower.file
            graph.save(outcome.model, tmp / file)
            made[tower].tower.size = graph.weight_bytes(tmp, file)
            made[tower].work.update(self._graph_facts(tmp / file))
            job.say(accuracy.summary(tower, record["towers"][tower]))
        job.state["fallback"] = record
        job.say("verifying the variant with its fp32 layers")
        return self.verify(job, tmp, {name: m.tower for name, m in made.items()})

    # -- a decoder's int4: methods and mixed precision (vlmopt.quantization.int4) --------------------
    def _prepare_decoders(self, job: Job, modes: dict[str, str]) -> None:
        """Which int4 parts are decoders (a KV cache), the methods' bad input refused, and the calibration text read."""
        from vlmopt.families.base import kv_contract

        options: QuantizeOptions = job.options
        decoders = [name for name, mode in modes.items() if mode == "int4" and kv_contract(job.towers[name]) is not None]
        job.state["decoders"] = decoders
        job.state["decoder_int4"] = {}
        if not options.part or (options.method in (None, "rtn") and not options.fallback):
            return
        others = [name for name, mode in modes.items() if mode in ("int4", "gather-int4") and name not in decoders]
        if others or not decoders:
            what = "--fallback" if options.method in (None, "rtn") else f"--method {options.method}"
            raise VlmoptError(
                f"{what} applies to a decoder's MatMuls (a part with a KV cache); the {', '.join(others) or 'named'} part "
                f"is not one (only rtn quantizes it); drop {what} or name --part decoder=int4"
            )
        if options.method in DATA_AWARE:
            from vlmopt.quantization import int4

            job.state["calib_text"] = int4.calibration_text(self._preprocessor(job).tokenizer, options.calib_text, options.calib_samples)

    def _preprocessor(self, job: Job) -> Any:
        from vlmopt.families import family_named

        family = family_named(job.parent.traits.family)
        return family.preprocessor(job.model_dir.checkpoint_folder(job.parent))

    def _part_producing(self, job: Job, output: str) -> str:
        found = next((name for name, record in job.parent.towers.items() if any(o.name == output for o in record.tower.outputs)), None)
        if found is None:
            raise VlmoptError(f"'{job.parent.name}' has no part that makes {output}; a decoder's int4 methods need one to embed text")
        return found

    def _decoder_int4(self, job: Job, tower: str, source: Path, destination: Path) -> dict[str, Any]:
        """The decoder as int4 MatMulNBits by --method; with --method auto or --fallback the tools to score it are kept."""
        from vlmopt.quantization import int4
        from vlmopt.runners.generate import ort_session

        options: QuantizeOptions = job.options
        threads = job.context.thread_count
        fp32 = _fp32_graph(source)
        exclude = list(options.exclude_nodes)
        if options.nodes:  # MatMulNBitsQuantizer adds `nodes_to_include` to the op types instead of restricting to them
            exclude += [n.name for n in int4.weight_matmuls(fp32) if n.name not in options.nodes]
        settings = int4.Settings(options.block_size, options.symmetric, options.accuracy_level, exclude, threads)
        details: dict[str, Any] = {"op_types": ["MatMul"], "accuracy_level": options.accuracy_level}
        default, plan = None, None
        if options.method is None:  # the default: a decoder from a GGUF (its matrices on GGUF grids) keeps them exactly
            plan = int4.grid_plan(fp32, settings, job.say)
            on_grid, total = int4.grid_share(fp32, settings, plan)
            default = "grid" if total and on_grid * 2 >= total else "rtn"
            details["default"] = f"{default}: {on_grid} of {total} matrices are on a GGUF grid" + (
                " (grid where at least half are: it keeps them exactly)" if default == "grid" else " (fewer than half: nothing to keep)"
            )
            job.say(f"--method {details['default']}")
        if options.method in (None, "rtn") and not options.fallback:
            method = default or "rtn"
            quantized = int4.quantize(method, fp32, settings, None, job.say, plan)
            details.update(method=method, weights=int4.describe(method, settings))
            self._grid_counts(details, method, quantized, plan, int4.matrix_names(fp32))
            graph.save(quantized, destination)
            job.state["decoder_int4"][tower] = {"fp32": fp32, "quantized": quantized, "settings": settings, "method": method, "plan": plan}
            return details
        embedding = ort_session(job.parent_file(self._part_producing(job, "inputs_embeds")), threads)
        reference = ort_session(source, threads)
        feeds = None
        if options.method in DATA_AWARE:
            calib = job.state["calib_text"]
            job.say(f"calibration: {len(calib.windows)} windows of {int4.CALIB_WINDOW} tokens of {calib.source}")
            feeds = int4.decoder_feeds(embedding, reference, calib.windows)
            details["calibration"] = calib.to_json()
        scorer = None
        if options.method == "auto" or options.fallback:
            from vlmopt.samples import text_tokens
            from vlmopt.verification.generation import TEXT_TOKENS, WINDOW

            preprocessor = self._preprocessor(job)
            ids, _ = text_tokens(preprocessor.tokenizer, TEXT_TOKENS)
            job.say("scoring on the gate's text: the fp32 decoder's next tokens and perplexity")
            scorer = int4.TokenScorer(embedding, reference, ids, min(WINDOW, preprocessor.max_positions, len(ids)), threads)
        del embedding, reference
        gates = (options.min_token_agreement, options.max_ppl_increase)
        if options.method == "auto":
            quantized, choice, plan = int4.auto(fp32, settings, feeds or [], scorer, gates, job.say)
            details["auto"] = {"chosen": choice.method, "why": choice.why, "tried": choice.tried, "data": "the gate's text (its token gates)"}
            method = choice.method
        else:
            method = options.method or default or "rtn"
            job.say(f"int4 by {method}: the {tower} part")
            quantized = int4.quantize(method, fp32, settings, feeds, job.say, plan)
        details.update(method=method, weights=int4.describe(method, settings))
        self._grid_counts(details, method, quantized, plan, int4.matrix_names(fp32))
        graph.save(quantized, destination)
        job.state["decoder_int4"][tower] = {"fp32": fp32, "quantized": quantized, "scorer": scorer, "settings": settings, "method": method, "plan": plan}
        return details

    @staticmethod
    def _grid_counts(details: dict[str, Any], method: str, quantized: Any, plan: dict[str, Any] | None, names: dict[str, str] | None = None) -> None:
        """grid's record: how many matrices stayed on their GGUF grid, in which form, and per matrix which form and why."""
        from vlmopt.quantization import int4

        if method != "grid":
            return
        kept = [n for n in quantized.graph.node if int4.is_grid_node(n)]
        forms: dict[str, int] = {}
        for node in kept:
            label = int4.grid_label(node.name.rsplit("/grid:", 1)[1])
            forms[label] = forms.get(label, 0) + 1
        int8 = sum(n.op_type == "MatMulNBits" for n in quantized.graph.node) - len(kept)
        if int8:
            forms["8-bit rtn (on no GGUF grid, or kept out of int4)"] = int8
        details["grid"] = {"kept_on_their_grid": len(kept), "int8": int8, "forms": forms}
        if plan is not None:
            on_grid = {n.name.rsplit("/grid:", 1)[0] for n in kept}
            rows = int4.grid_summary(plan, names)["matrices"]
            for row in rows:
                if row["node"] not in on_grid and "max_relative_error" in row:
                    row.update(form="8-bit rtn (kept out of int4 by --fallback)", why="among the most sensitive: kept at int8 until the token gates pass")
            details["grid_matrices"] = rows

    def _decoder_splicer(self, state: dict[str, Any]) -> Any:
        """The decoder's fp32 and int4 graphs, node by node, with the matrices --fallback could move up as candidates."""
        from vlmopt.quantization import fallback, int4

        splicer = fallback.Splicer(state["fp32"], state["quantized"])
        if state["method"] == "grid":  # grid made the matrices off a 4-bit grid 8-bit already: only the 4-bit ones can move up
            splicer.candidates = [c for c in splicer.candidates if any(int4.is_grid_node(n, 4) for n in splicer.slices[c].nodes)]
        return splicer

    def _decoder_sensitivity(self, job: Job, failed: CheckFailed) -> None:
        """A decoder's int4 missed a token gate without --fallback: the refusal names its most sensitive matrices (the
        relative error of each one's output when only it is int4, on the gate's text), the command that keeps them,
        and records every matrix's figure in the report."""
        from vlmopt.quantization import fallback, int4
        from vlmopt.runners.generate import ort_session
        from vlmopt.samples import text_tokens
        from vlmopt.verification.generation import TEXT_TOKENS, WINDOW

        options: QuantizeOptions = job.options
        threads = job.context.thread_count
        preprocessor = self._preprocessor(job)
        ids, _ = text_tokens(preprocessor.tokenizer, TEXT_TOKENS)
        window = min(WINDOW, preprocessor.max_positions, len(ids))
        embedding = ort_session(job.parent_file(self._part_producing(job, "inputs_embeds")), threads)
        report: dict[str, list[dict[str, Any]]] = {}
        for tower, state in job.state["decoder_int4"].items():
            job.say(f"ranking the {tower} part's matrices by sensitivity (the token gates failed)")
            reference = ort_session(job.parent_file(tower), threads)
            feeds = int4.text_feeds(embedding, reference, ids, window)
            del reference
            splicer = self._decoder_splicer(state)
            report[tower] = _sensitivity_json(splicer, fallback.sensitivity(splicer, feeds, threads), readable=True)
        flags = [f"--part {name}={mode}" for name, mode in options.parts.items()] + ([f"--method {options.method}"] if options.method else [])
        for flag, value in (("--min-token-agreement", options.min_token_agreement), ("--max-ppl-increase", options.max_ppl_increase)):
            flags.append(f"{flag} {'off' if value is None else f'{value:g}'}")
        command = f"vlmopt quantize {job.model_dir.path} {' '.join(flags)} --fallback"
        raise CheckFailed(
            f"{failed.message.removesuffix('; nothing was written')}; {_sensitivity_line(report, 'matrices', 'part', 'int4 alone')}; "
            f"to keep the fewest of them at int8 until the gates pass: {command}; nothing was written",
            details={**failed.details, "report": {"sensitivity": report, "fallback_command": command}},
        )

    def _decoder_fallback(self, job: Job, tmp: Path, made: dict[str, Made], failed: CheckFailed) -> Verification:
        """Mixed precision: the decoder's matrices ranked by sensitivity, the fewest of them kept at int8 (or fp32)
        until both token gates pass on the gate's text, then the whole variant verified again."""
        from vlmopt.quantization import fallback, int4

        options: QuantizeOptions = job.options
        threads = job.context.thread_count
        gates = (options.min_token_agreement, options.max_ppl_increase)
        record: dict[str, Any] = {"needed": True, "keep_precision": options.fallback_precision, "data": "the gate's text (its token gates)", "towers": {}}
        for tower, state in job.state["decoder_int4"].items():
            scorer = state["scorer"]
            job.say(f"ranking the {tower} part's matrices by sensitivity")
            splicer = self._decoder_splicer(state)
            ranking = fallback.sensitivity(splicer, scorer.feeds, threads)
            keeper = splicer if options.fallback_precision == "fp32" else int4.Int8Keeper(splicer, int4.rtn(state["fp32"], state["settings"], bits=8))
            seen: list[dict[str, float]] = []

            def evaluate(model: Any, scorer: Any = scorer, seen: list[dict[str, float]] = seen) -> np.ndarray:
                scores = scorer(model)
                seen.append(scores)
                return np.array([-int4.margin(scores, *gates)])

            # kept matrices stay 8-bit (not fp32) by default: all but one may stay unless --fallback-budget says less
            share = 1.0 if options.fallback_budget is None else options.fallback_budget
            budget = fallback.layer_budget(share, len(splicer.candidates))
            job.say(f"searching the fewest matrices of the {tower} part to keep at {options.fallback_precision}")
            result = fallback.search(keeper, evaluate, 1.0, ranking, max_kept=budget, say=job.say)
            full = seen[0]  # every evaluation adds one step, the fully int4 graph first
            if result.passed:
                best = seen[max(i for i, s in enumerate(result.steps) if s.passed and s.kept == len(result.kept))]
            else:
                best = seen[int(np.argmax([s.value for s in result.steps]))]
            top = _sensitivity_json(splicer, ranking, readable=True)
            if not result.passed:
                raise CheckFailed(
                    f"the {tower} part: the token gates cannot be reached with up to {budget} of {len(splicer.candidates)} matrices at "
                    f"{options.fallback_precision}; the best found is top-1 agreement {best['top1_agreement']:.4f}, perplexity "
                    f"{best['ppl_increase']:+.2%} with {len(result.kept)} kept ({state['method']} int4 alone: {full['top1_agreement']:.4f}, "
                    f"{full['ppl_increase']:+.2%}); {_sensitivity_line({tower: top}, 'matrices', 'part', 'int4 alone')}; nothing was written",
                    details={**failed.details, "report": {"sensitivity": {tower: top}}, "fallback": {tower: result.to_json()}},
                )
            mixed = keeper.revert(result.kept)
            file = made[tower].tower.file
            graph.save(mixed, tmp / file)
            job.say(f"profiling the {tower} part's kept matrices at one position (a decode step)")
            costs = _decode_costs(state["quantized"], mixed, scorer.feeds[0], result.kept, splicer, threads)
            record["towers"][tower] = {
                "method": state["method"],
                "fully_int4": full,
                "reached": best,
                "quantized_layers": len(splicer.candidates),
                "kept": [
                    {
                        "matrix": int4.readable(splicer.f_nodes[n]),
                        "node": n,
                        "precision": options.fallback_precision,
                        "sensitivity": dict(result.ranking)[n],
                        "weights": splicer.weight_size(n),
                        **costs["layers"].get(n, {}),
                    }
                    for n in result.kept
                ],
                "speed": {k: v for k, v in costs.items() if k != "layers"},
                "search": {
                    "evaluations": result.evaluations,
                    "seconds": round(result.seconds, 2),
                    "steps": [[s.kept, round(s.value - 1.0, 6)] for s in result.steps],
                },
                "top_sensitive": top[:SENSITIVITY_SHOWN],
            }
            made[tower].tower.size = graph.weight_bytes(tmp, file)
            made[tower].work.update(self._graph_facts(tmp / file))
            self._grid_counts(made[tower].work["quantization"], state["method"], mixed, state["plan"], int4.matrix_names(state["fp32"]))
            made[tower].work["quantization"]["weights"] += f"; {len(result.kept)} of {len(splicer.candidates)} matrices at {options.fallback_precision}"
        job.state["fallback"] = record
        job.say("verifying the variant with its mixed-precision decoder")
        return self.verify(job, tmp, {name: m.tower for name, m in made.items()})

    def _gate_feeds(self, job: Job, tower: str) -> list[dict[str, np.ndarray]]:
        """The feeds the tower's cosine gate is measured on: its real evaluation sets (synthetic where it has none)."""
        from vlmopt.verification.check import evaluation_sets

        return [feed for s in evaluation_sets(job.towers[tower], job.state.get("data")) if s.gated for feed in s.feeds]

    def _outlier_feeds(self, job: Job, tower: str) -> list[dict[str, np.ndarray]] | None:
        """The real calibration data int8-dynamic chooses a tower's outlier channels on (none: synthetic inputs say
        nothing of a trained model's outliers, and --split-outliers 0 or --part asks for none)."""
        data = job.state.get("calibration_data")
        if data is None or data.for_tower(job.towers[tower]) is None:
            return None
        return self._calibration(job, tower)

    def _calibration(self, job: Job, tower: str) -> list[dict[str, np.ndarray]]:
        options: QuantizeOptions = job.options
        spec = job.towers[tower]
        feeds, origin = calibration_feeds(spec, job.state["calibration_data"], options.calib_samples)
        samples = sample_count(feeds)
        if origin == "synthetic":
            job.warn(synthetic_warning(spec, samples))
        job.state["calibration"][tower] = {
            "data": origin,
            "source": calibration_source(spec, job.state["calibration_data"]) or "random inputs",
            "samples": samples,
            "method": options.calib_method,
        }
        return feeds

    def verify(self, job: Job, tmp: Path, towers: dict[str, TowerRecord]) -> Verification | None:
        """Every tower against the parent's on the same inputs; a generative family's variant also on real text (token agreement, perplexity)."""
        from vlmopt.families import family_named
        from vlmopt.verification import Gates, verify_artifacts

        candidate = provisional(self, job, tmp, towers)
        gates = Gates.of(job.options)
        threads = job.context.thread_count
        family = family_named(job.parent.traits.family)
        extra = None
        if family is not None and family.generative:
            from vlmopt.verification.generation import variant_checks

            preprocessor = family.preprocessor(job.model_dir.checkpoint_folder(job.parent))
            extra = lambda: ({}, variant_checks(preprocessor, job.parent_dir, job.parent, tmp, candidate, gates, threads, job.say))  # noqa: E731
        job.say(f"verifying against '{job.parent.name}'")
        return verify_artifacts(job.parent_dir, job.parent, tmp, candidate, gates, data=job.state.get("data"), threads=threads, extra=extra)

    def traits(self, job: Job, made: dict[str, Made]) -> Traits:
        options: QuantizeOptions = job.options
        return job.parent.traits.derive(
            precision=",".join([*(f"{name}={mode}" for name, mode in options.parts.items()), *([f"prefill={options.prefill}"] if options.prefill else [])])
            if options.part
            else options.mode,
            target=options.target,
            ort_only_ops=sorted({d for m in made.values() for d in m.work["ort_only_ops"]}),
            tensorrt_issues={name: m.work["tensorrt_issue"] for name, m in made.items()},
        )

    def describe(self, artifact: Any) -> list[Any]:
        lines = []
        if artifact.traits.target == "tensorrt":
            for tower, issue in artifact.traits.tensorrt_issues.items():
                lines.append(f"TensorRT (strongly typed): {tower} " + ("[green]ready[/]" if issue is None else f"[red]not ready[/]: {escape(issue)}"))
        for tower, info in (artifact.record.get("calibration") or {}).items():
            label = "[bold yellow]SYNTHETIC[/]" if info["data"] == "synthetic" else f"real ({escape(info.get('source', 'real'))})"
            lines.append(f"calibration of {tower}: {info['samples']} {label} samples, {info['method']}")
        for tower, work in (artifact.record.get("towers") or {}).items():
            lines += _decoder_lines(tower, work.get("quantization") or {})
            prefill = work.get("prefill")
            if prefill:
                lines.append(
                    f"prompt decoder of {tower}: {escape(prefill['file'])}, {prefill['mode']} ({prefill['size'] / 2**20:.1f} MB); decode steps run the {work['mode']} one"
                )
        fallback = artifact.record.get("fallback") or {}
        if "keep_precision" in fallback:
            for tower, info in (fallback.get("towers") or {}).items():
                lines += _decoder_fallback_lines(tower, info)
            return lines
        for tower, info in (fallback.get("towers") or {}).items():
            lines.append(escape(summary(tower, info)))
            if info.get("needed"):
                lines.append(_sensitivity_table(tower, info["top_sensitive"], {k["node"]: k for k in info["kept"]}))
        if fallback and not fallback.get("needed", True):
            lines.append("fallback: not needed, the fully quantized variant passed its gates")
        return lines

    def record(self, job: Job, made: dict[str, Made]) -> dict[str, Any]:
        record = super().record(job, made)
        if job.state["calibration"]:
            record["calibration"] = job.state["calibration"]
        if job.state.get("fallback") is not None:
            record["fallback"] = job.state["fallback"]
        return record

    def describe_report(self, report: dict[str, Any]) -> list[Any]:
        """A failed gate's per-layer sensitivity, as a table per tower."""
        return [_sensitivity_table(tower, rows, set()) for tower, rows in (report.get("sensitivity") or {}).items()]


def _decoder_lines(tower: str, details: dict[str, Any]) -> list[str]:
    """`info`'s lines for a decoder's int4 method: which, why (auto), and the calibration text."""
    if "method" not in details:
        return []
    lines = [f"{tower}: {escape(details.get('weights', ''))}"]
    forms = (details.get("grid") or {}).get("forms")
    if forms:
        lines.append(f"{tower}: kept on their GGUF grid: " + escape(", ".join(f"{n} {label}" for label, n in forms.items())))
    auto = details.get("auto")
    if auto:
        tried = ", ".join(
            f"{m} {t['top1_agreement']:.4f} / {t['ppl_increase']:+.2%}" + ("" if t["passed"] else " (fails)")
            if "error" not in t
            else f"{m} not run ({t['error'][:80]})"
            for m, t in auto["tried"].items()
        )
        lines.append(f"{tower}: --method auto chose {auto['chosen']}: {escape(auto['why'])}; top-1 agreement / perplexity on the gate's text: {escape(tried)}")
    calib = details.get("calibration")
    if calib:
        lines.append(f"{tower}: calibrated on {calib['windows']} windows of {calib['window']} tokens of {escape(calib['source'])}")
    return lines


def _decoder_fallback_lines(tower: str, info: dict[str, Any]) -> list[Any]:
    from rich.table import Table

    speed, kept = info["speed"], info["kept"]
    full, reached = info["fully_int4"], info["reached"]
    lines: list[Any] = [
        f"mixed precision of {tower}: {len(kept)} of {info['quantized_layers']} matrices kept at {kept[0]['precision'] if kept else '-'}; "
        f"top-1 agreement {full['top1_agreement']:.4f} -> {reached['top1_agreement']:.4f}, perplexity {full['ppl_increase']:+.2%} -> "
        f"{reached['ppl_increase']:+.2%}; decode step (kernel time, one position) {speed['int4_step_ms']:.2f} -> {speed['mixed_step_ms']:.2f} ms "
        f"({speed['int4_tokens_per_s']} -> {speed['mixed_tokens_per_s']} tokens/s)"
    ]
    table = Table(title=f"matrices of {tower} kept out of int4 (relative output error when int4 alone)", title_justify="left")
    for column in ("matrix", "sensitivity", "weights", "kept at", "int4 ms", "kept ms", "cost ms"):
        table.add_column(column, justify="left" if column in ("matrix", "kept at") else "right")
    for row in kept:
        table.add_row(
            escape(row.get("matrix", row["node"])),
            f"{row['sensitivity']:.4g}",
            f"{row['weights']:,}",
            row["precision"],
            f"{row.get('int4_ms', 0):.3f}",
            f"{row.get('kept_ms', 0):.3f}",
            f"{row.get('cost_ms', 0):.3f}",
        )
    lines.append(table)
    return lines


def _token_gates_failed(failed: CheckFailed) -> bool:
    """Whether a failed verification failed on a token gate (agreement or perplexity) and on nothing else."""
    data = failed.details.get("verification")
    if not data:
        return False
    verification = Verification.from_json(data)
    metrics = [m for m in verification.metrics if not m.passed]
    tokens = [m for m in metrics if m.gate in ("--min-token-agreement", "--max-ppl-increase")]
    outputs = [o for _, o in verification.gated_outputs() if not o.passed]
    return bool(tokens) and len(tokens) == len(metrics) and not outputs


def _decode_costs(int4_graph: Any, mixed: Any, feed: dict[str, np.ndarray], kept: list[str], splicer: Any, threads: int | None) -> dict[str, Any]:
    """Kernel time of one decode-sized run (one position, no past): each kept matrix in the mixed graph against its int4
    MatMulNBits, and both graphs' totals as tokens/s (kernel time only; ONNX Runtime's profiler)."""
    from vlmopt.quantization.fallback import _profile

    one = {k: (v[:, :1] if k in ("inputs_embeds", "attention_mask", "position_ids") else v) for k, v in feed.items()}
    full, mix = _profile(int4_graph, one, 10, threads), _profile(mixed, one, 10, threads)
    by_output_full = {n.output[0]: n.name for n in int4_graph.graph.node if n.output}
    by_output_mix = {n.output[0]: n.name for n in mixed.graph.node if n.output}
    layers = {}
    for name in kept:
        out = splicer.slices[name].outputs[0]
        before, after = full.get(by_output_full.get(out, ""), 0.0), mix.get(by_output_mix.get(out, ""), 0.0)
        layers[name] = {"int4_ms": round(before / 1e3, 4), "kept_ms": round(after / 1e3, 4), "cost_ms": round((after - before) / 1e3, 4)}
    total_full, total_mix = sum(full.values()) / 1e3, sum(mix.values()) / 1e3
    return {
        "layers": layers,
        "int4_step_ms": round(total_full, 3),
        "mixed_step_ms": round(total_mix, 3),
        "int4_tokens_per_s": round(1000 / total_full, 1) if total_full else None,
        "mixed_tokens_per_s": round(1000 / total_mix, 1) if total_mix else None,
    }


def mode_op_types(options: QuantizeOptions) -> list[str]:
    """The operator types a mode quantizes (after --op-types and --exclude-op-types)."""
    if options.mode == "int8-dynamic":
        return _op_types(options, INT8_DYNAMIC_OPS)
    if options.mode == "int8-static":
        return _op_types(options, INT8_TENSORRT_OPS if options.target == "tensorrt" else INT8_STATIC_CPU_OPS)
    return _op_types(options, ("MatMul",))


def quantizable_layers(path: Path, op_types: list[str]) -> int:
    """Nodes of `op_types` that multiply by a weight (an initializer): the layers a mode quantizes."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    return sum(1 for n in model.graph.node if n.op_type in op_types and any(i in weights for i in n.input))


def _fp32_graph(path: Path) -> Any:
    """The fp32 parent as the quantizers read it: without recorded value_info (`_prepared`)."""
    model = graph.load(path)
    del model.graph.value_info[:]
    return model


def _sensitivity_json(splicer: Any, ranking: list[tuple[str, float]], readable: bool = False) -> list[dict[str, Any]]:
    """Per node, its sensitivity; `readable`: with the matrix's name as the model names it (layers.3.mlp.down_proj)."""
    from vlmopt.quantization.int4 import readable as name_of

    return [
        {
            **({"matrix": name_of(splicer.f_nodes[n])} if readable else {}),
            "node": n,
            "op": splicer.slices[n].op_type,
            "sensitivity": round(score, 6),
            "weights": splicer.weight_size(n),
        }
        for n, score in ranking
    ]


def _sensitivity_line(report: dict[str, list[dict[str, Any]]], what: str = "layers", kind: str = "tower", alone: str = "quantized alone") -> str:
    parts = []
    for tower, rows in report.items():
        top = ", ".join(f"{r.get('matrix', r['node'])} {r['sensitivity']:.3g}" for r in rows[:5])
        parts.append(f"most sensitive {what} of the {tower} {kind} (relative output error when {alone}): {top}")
    return "; ".join(parts)


def _sensitivity_table(tower: str, rows: list[dict[str, Any]], kept: dict[str, dict[str, Any]] | set[str]) -> Any:
    from rich.table import Table

    table = Table(title=f"per-layer sensitivity of the {tower} tower (relative output error when quantized alone)", title_justify="left")
    for column in ("rank", "layer", "op", "sensitivity", "weights", "kept fp32", "cost of keeping it (ms)"):
        table.add_column(column, justify="left" if column in ("layer", "op", "kept fp32") else "right")
    for rank, row in enumerate(rows[:SENSITIVITY_SHOWN], 1):
        info = kept.get(row["node"]) if isinstance(kept, dict) else None
        cost = f"{info['cost_ms']:.2f}" if info and "cost_ms" in info else ""
        table.add_row(
            str(rank),
            escape(row.get("matrix", row["node"])),
            row["op"],
            f"{row['sensitivity']:.4g}",
            f"{row['weights']:,}" if "weights" in row else "",
            "yes" if row["node"] in kept else "",
            cost,
        )
    return table


#: standard ONNX operators TensorRT's parser does not implement (integer matmuls, fused quantized ops)
TENSORRT_UNSUPPORTED = ("MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "QLinearMatMul", "QLinearConv", "QLinearAdd")


def tensorrt_ready(model: Any, domains: list[str]) -> tuple[bool, str | None]:
    """Whether a strongly typed TensorRT build can take the graph as is: standard ops TensorRT implements,
    INT8 only as symmetric Q/DQ (zero zero-points, no INT32 bias), and types that check."""
    import onnx
    from onnx import numpy_helper

    if domains:
        return False, f"ONNX Runtime-only operators ({', '.join(domains)})"
    unsupported = sorted({n.op_type for n in model.graph.node if n.op_type in TENSORRT_UNSUPPORTED})
    if unsupported:
        return False, f"operators TensorRT does not implement ({', '.join(unsupported)})"
    initializers = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2 and node.input[2] in initializers:
            zero_point = initializers[node.input[2]]
            if zero_point.data_type == onnx.TensorProto.INT32:
                return False, f"INT32 dequantization ({node.name}: a quantized bias)"
            if zero_point.data_type != onnx.TensorProto.INT8 or numpy_helper.to_array(zero_point).any():
                return False, f"asymmetric or unsigned Q/DQ ({node.name})"
    try:
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as exc:
        return False, f"type check failed: {str(exc).splitlines()[0][:160]}"
    return True, None


STAGE = Quantize()
