"""`vlmopt quantize`: fp16, INT8 (dynamic, calibrated static QDQ for CPU or TensorRT) and INT4 weight-only variants.

Every mode is a thin layer over ONNX Runtime's own tools (`float16.convert_float_to_float16`,
`quantization.quantize_dynamic` / `quantize_static`, `MatMulNBitsQuantizer`); what vlmopt adds is the
choice of defaults (measured, see the module constants), calibration data, and the check of every
variant against its fp32 parent before it is committed.

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
from vlmopt.calibration import calibration_feeds, load_calibration, sample_count, synthetic_warning
from vlmopt.errors import CheckFailed, VlmoptError
from vlmopt.options import (
    StageOptions,
    max_ppl_increase_option,
    min_agreement_option,
    min_cosine_option,
    min_token_agreement_option,
    name_option,
    option,
    source_option,
)
from vlmopt.quiet import quiet_onnxruntime_tools
from vlmopt.records import TowerRecord, Traits, Verification
from vlmopt.stage import Accepts, Job, Made, Stage, provisional
from vlmopt.workspace import Artifact, StageOutput

MODES = ("fp16", "bf16", "int8-dynamic", "int8-static", "int4")
#: per-part modes beyond MODES: weight-only 8-bit MatMul (MatMulNBits), the token table as GatherBlockQuantized, unchanged
PART_MODES = ("int8-weight", "gather-int8", "gather-int4", "fp32")
#: what each mode must leave in the graph: (operator that must appear, what it quantizes)
QUANTIZED_OPS = {
    "int4": ("MatMulNBits", "MatMul"),
    "int8-weight": ("MatMulNBits", "MatMul"),
    "int8-dynamic": (("MatMulInteger", "DynamicQuantizeMatMul", "QAttention"), "MatMul"),
    "int8-static": ("QuantizeLinear", "MatMul/Gemm"),
    "gather-int4": ("GatherBlockQuantized", "Gather"),
    "gather-int8": ("GatherBlockQuantized", "Gather"),
}
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
DEFAULT_NAMES = {"fp16": "fp16", "bf16": "bf16", "int8-dynamic": "int8-dynamic", "int8-static": "int8-static", "int4": "int4"}


@dataclass
class QuantizeOptions(StageOptions):
    mode: str = option("int8-dynamic", "fp16, int8-dynamic, int8-static or int4 (bf16 is refused: no ONNX Runtime CPU kernels).", choices=MODES)
    source: str = source_option("onnx", "the fp32 ONNX artifact to quantize (onnx, onnx-opt, ...)")
    name: str | None = name_option(None, "the mode, int8-static-trt for TensorRT")
    target: str = option("cpu", "cpu, or tensorrt: symmetric INT8 Q/DQ on MatMul/Gemm only, float bias.", choices=TARGETS)
    per_channel: bool = option(False, "INT8 weights with one scale per output channel.")
    reduce_range: bool = option(False, "7-bit INT8 weights (for CPUs without VNNI).")
    calib_images: str | None = option(None, "int8-static: a folder of jpg/png images for calibration.", path=True, metavar="DIR")
    calib_text: str | None = option(None, "int8-static: a text file, one prompt a line, for calibration.", path=True, metavar="FILE")
    calib_samples: int = option(64, "Most calibration samples per tower (synthetic ones too).", minimum=1)
    calib_method: str = option("minmax", "int8-static range estimation: minmax, entropy or percentile.", choices=CALIBRATION_METHODS)
    percentile: float = option(99.999, "Percentile for --calib-method percentile.", minimum=90.0, maximum=100.0, exclusive=("max",))
    part: list[str] = option(
        [], "Quantize one part: PART=MODE, repeatable (decoder=int4 vision=int8); parts not named are copied unchanged.", metavar="PART=MODE"
    )
    block_size: int = option(32, "int4 and weight-only int8: weights per quantization block (power of two, >= 16).", minimum=16)
    accuracy_level: int = option(4, "int4 and weight-only int8: MatMulNBits compute (0 fp32 ... 4 int8).", minimum=0, maximum=4)
    symmetric: bool = option(True, "int4 and weight-only int8: symmetric blocks; --asymmetric adds a zero point per block.", flag="--symmetric/--asymmetric")
    op_types: list[str] = option([], "Only quantize these op types (repeatable or comma-separated).")
    exclude_op_types: list[str] = option([], "Never quantize these op types (fp16: keep them in fp32).")
    nodes: list[str] = option([], "Only quantize these nodes (by name).")
    exclude_nodes: list[str] = option([], "Never quantize these nodes (by name).")
    keep_io_types: bool = option(True, "fp16: keep graph inputs and outputs fp32.", flag="--keep-io-types/--fp16-io")
    min_cosine: float | None = min_cosine_option(0.99)
    min_agreement: float | None = min_agreement_option(None)
    # measured on SmolLM2-135M (README): weight-only int8 0.955 and +0.7 %, int4 0.67 and +33 %
    min_token_agreement: float | None = min_token_agreement_option(0.90)
    max_ppl_increase: float | None = max_ppl_increase_option(0.05)

    @property
    def parts(self) -> dict[str, str]:
        """--part as {part: mode}, in the order given."""
        parts: dict[str, str] = {}
        for item in self.part:
            name, sep, mode = item.partition("=")
            if not sep or not name.strip() or not mode.strip():
                raise VlmoptError(f"--part takes PART=MODE (decoder=int4), got '{item}'")
            if name.strip() in parts:
                raise VlmoptError(f"--part names {name.strip()} twice")
            parts[name.strip()] = mode.strip()
        return parts

    @property
    def artifact(self) -> str:
        if self.name:
            return self.name
        if self.part:
            return "_".join(f"{name}-{mode}" for name, mode in self.parts.items())
        return "int8-static-trt" if self.mode == "int8-static" and self.target == "tensorrt" else DEFAULT_NAMES.get(self.mode, self.mode)

    def check(self) -> None:
        if self.part:
            self.parts  # noqa: B018 - refuses a malformed --part
            if self.mode != "int8-dynamic":
                raise VlmoptError("--mode sets one mode for every tower and --part one per part; use one of them")
            if self.target != "cpu":
                raise VlmoptError("--part makes CPU variants; drop --target")
        if self.mode == "bf16":
            raise VlmoptError(
                "--mode bf16 is not available: ONNX Runtime's CPU provider has no bf16 MatMul/Add kernels, so a bf16 graph "
                "cannot be verified here, and ONNX Runtime ships no bf16 converter; use --mode fp16"
            )
        if self.target == "tensorrt" and self.mode not in ("int8-static", "fp16"):
            raise VlmoptError(f"--target tensorrt applies to int8-static and fp16; {self.mode} makes ONNX Runtime-only operators")
        if self.mode != "int8-static" and (self.calib_images or self.calib_text or self.calib_method != "minmax"):
            raise VlmoptError("--calib-images, --calib-text and --calib-method calibrate int8-static; drop them for " + self.mode)
        if self.block_size & (self.block_size - 1):
            raise VlmoptError(f"--block-size must be a power of two of at least 16, got {self.block_size}")
        if (self.per_channel or self.reduce_range) and self.mode not in ("int8-dynamic", "int8-static"):
            raise VlmoptError(f"--per-channel and --reduce-range apply to int8 modes, not {self.mode}")
        if self.mode == "fp16" and self.op_types:
            raise VlmoptError("fp16 converts every op it can; keep some in fp32 with --exclude-op-types or --exclude-nodes instead of --op-types")
        if self.target == "tensorrt" and self.op_types and set(self.op_types) - set(INT8_TENSORRT_OPS):
            extra = sorted(set(self.op_types) - set(INT8_TENSORRT_OPS))
            raise VlmoptError(f"--target tensorrt quantizes only {', '.join(INT8_TENSORRT_OPS)}; drop {', '.join(extra)} from --op-types")
        overlap = set(self.op_types) & set(self.exclude_op_types) or set(self.nodes) & set(self.exclude_nodes)
        if overlap:
            raise VlmoptError(f"{', '.join(sorted(overlap))} is both included and excluded")


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


def int8_dynamic(source: Path, destination: Path, options: QuantizeOptions) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    op_types = _op_types(options, INT8_DYNAMIC_OPS)
    kept = _biased_attention(source) if "Attention" in op_types else []
    with _prepared(source) as prepared:
        quantize_dynamic(
            prepared,
            destination,
            weight_type=QuantType.QInt8,
            per_channel=options.per_channel,
            reduce_range=options.reduce_range,
            op_types_to_quantize=op_types,
            nodes_to_quantize=options.nodes or None,
            nodes_to_exclude=[*options.exclude_nodes, *kept] or None,
            use_external_data_format=_large(source),
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    return {"op_types": op_types, "weights": "int8", "activations": "uint8 (dynamic)", "kept_fp32_attention_with_bias": kept}


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
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}[options.calib_method]
    with _prepared(source) as prepared, tempfile.TemporaryDirectory(prefix="vlmopt-calibration-") as scratch:
        cache = None
        if options.calib_method == "entropy":
            cache = _entropy_ranges(prepared, op_types, feeds, Path(scratch), symmetric=tensorrt)
        quantize_static(
            prepared,
            destination,
            _FeedReader(feeds),
            calibration_cache_path=cache,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=op_types,
            per_channel=options.per_channel,
            reduce_range=options.reduce_range,
            activation_type=QuantType.QInt8 if tensorrt else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=options.nodes or None,
            nodes_to_exclude=options.exclude_nodes or None,
            calibrate_method=method,
            use_external_data_format=_large(source),
            extra_options=extra,
        )
    activations = "int8 symmetric" if tensorrt else "uint8 asymmetric"
    return {"op_types": op_types, "format": "QDQ", "weights": "int8 symmetric", "activations": activations, "bias": "fp32" if tensorrt else "int32"}


def _entropy_ranges(model: Path, op_types: list[str], feeds: list[dict[str, np.ndarray]], scratch: Path, symmetric: bool) -> Path:
    """KL-divergence (entropy) ranges over a 2048-bin histogram, saved as a calibration cache for `quantize_static`.

    `quantize_static` builds its entropy calibrator with 128 bins and 128 quantized bins, which leaves one
    candidate threshold, the full range: exactly minmax. ONNX Runtime's own calibrator with TensorRT's
    histogram size (2048 bins) gives real entropy thresholds.
    """
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator, save_tensors_data

    calibrator = create_calibrator(
        model,
        op_types,
        augmented_model_path=str(scratch / "augmented.onnx"),
        calibrate_method=CalibrationMethod.Entropy,
        use_external_data_format=_large(model),
        extra_options={"num_bins": 2048, "num_quantized_bins": 128, "symmetric": symmetric},
    )
    calibrator.collect_data(_FeedReader(feeds))
    ranges = calibrator.compute_data()
    del calibrator
    cache = scratch / "ranges.json"
    save_tensors_data(ranges, cache)
    return cache


def int4(source: Path, destination: Path, options: QuantizeOptions, bits: int = 4) -> dict[str, Any]:
    """Weight-only MatMul quantization (MatMulNBits): 4 bits, or 8 (`int8-weight`, a decoder's int8: per-block
    scales keep a real LM within 1 % perplexity where dynamic int8's per-tensor activations lost 66 %, README)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

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
        offered = declared[name] or {m: m for m in (*MODES, "int8-weight") if m != "bf16"}
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
def _prepared(source: Path):
    """The source without recorded value_info: ORT's quantizers fail on dynamo exports' shapes otherwise (DESIGN.md)."""
    model = graph.load(source)
    del model.graph.value_info[:]
    with tempfile.TemporaryDirectory(prefix="vlmopt-quantize-") as folder:
        path = Path(folder) / source.name
        graph.save(model, path)
        del model
        yield path


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
    summary = "Make an fp16, INT8 or INT4 variant of an fp32 ONNX artifact and verify it against that artifact."
    details = (
        "Fails with exit 1, writing nothing, when the cosine or zero-shot agreement falls below the thresholds.\n"
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
        if "int8-static" in modes.values():
            chosen = {name: tower for name, tower in job.towers.items() if modes[name] == "int8-static"}
            job.state["data"] = load_calibration(job.model_dir, chosen, options.calib_images, options.calib_text, options.calib_samples)
        job.state["calibration"] = {}

    def build(self, job: Job, tmp: Path) -> StageOutput:
        copied = copy_runtime_files(job.parent_dir, job.parent, tmp)
        output = super().build(job, tmp)
        if copied:
            output.record["runtime_files"] = copied
        return output

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
                details = int8_dynamic(source, destination, options)
            elif mode == "int8-static":
                details = int8_static(source, destination, options, self._calibration(job, tower))
            elif mode in ("int4", "int8-weight"):
                details = int4(source, destination, options, bits=4 if mode == "int4" else 8)
            elif mode == "gather-int4":
                details = gather_int4(source, destination, options)
            else:
                details = gather_int8(source, destination, options)
        model = graph.load(destination)
        if options.part:  # a part's mode must quantize it; with --mode, --nodes/--op-types may rightly leave a tower untouched
            check_quantized(tower, mode, graph.op_counts(graph.load_structure(source)), graph.op_counts(model))
        domains = graph.custom_domains(model)
        work = {
            "mode": mode,
            "quantization": details,
            "op_counts": graph.op_counts(model),
            "parent_size": graph.weight_bytes(job.parent_dir, file),
            "ort_only_ops": domains,
            "tensorrt_issue": tensorrt_ready(model, domains)[1],
        }
        del model
        return Made(TowerRecord(job.towers[tower], file, graph.weight_bytes(tmp, file)), work)

    def _calibration(self, job: Job, tower: str) -> list[dict[str, np.ndarray]]:
        options: QuantizeOptions = job.options
        spec = job.towers[tower]
        feeds, origin = calibration_feeds(spec, job.state["data"], options.calib_samples)
        samples = sample_count(feeds)
        if origin == "synthetic":
            job.warn(synthetic_warning(spec, samples))
        job.state["calibration"][tower] = {"data": origin, "samples": samples, "method": options.calib_method}
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
            precision=",".join(f"{name}={mode}" for name, mode in options.parts.items()) if options.part else options.mode,
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
            label = "[bold yellow]SYNTHETIC[/]" if info["data"] == "synthetic" else "real"
            lines.append(f"calibration of {tower}: {info['samples']} {label} samples, {info['method']}")
        return lines

    def record(self, job: Job, made: dict[str, Made]) -> dict[str, Any]:
        record = super().record(job, made)
        if job.state["calibration"]:
            record["calibration"] = job.state["calibration"]
        return record


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
