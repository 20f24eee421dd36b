"""`vlmopt openvino`: OpenVINO IR (`.xml` + `.bin` per tower) from an ONNX artifact, as is or compressed by NNCF.

Modes, each a thin layer over OpenVINO's and NNCF's own calls:
- `fp32`: `Core.read_model` of the ONNX graph, saved as IR (`save_model(..., compress_to_fp16=False)`);
- `int8`: NNCF post-training quantization (`nncf.quantize`, model type transformer by default), calibrated
  on the same `--calib-images`/`--calib-text` as `quantize` (random inputs otherwise, said loudly);
- `int8-weights`/`int4-weights`: NNCF weight compression (`nncf.compress_weights`), data-free, the form
  generative decoders are deployed in.

From an OpenVINO parent (`--from openvino-int8 --static-batch 8 --performance-hint throughput`) the IR is
taken as it is and only what the stage sets around it changes (fixed batch, recorded inference precision,
hint, device): a quantized model re-targeted at a served batch without quantizing it again.

The IR is made from the ONNX artifact rather than from PyTorch (`ov.convert_model` on the module): both
run at the same speed here within noise, the ONNX route converts in a fraction of the time, and it keeps
the tower interface the manifest records (input/output names, dynamic axes) and a parent to verify
against. How OpenVINO computes the float parts (`--inference-precision`: f32, bf16, or OpenVINO's own
default, bf16 on CPUs with AVX512_BF16 or AMX) and the performance hint are recorded with each tower; the
runner compiles with them, and verification records the precisions the compiled model actually ran.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.markup import escape

from vlmopt.calibration import calibration_feeds, calibration_source, load_calibration, sample_count, synthetic_warning
from vlmopt.errors import CheckFailed, VlmoptError
from vlmopt.families import Tower, family_named
from vlmopt.families.base import SHARED, kv_contract
from vlmopt.inputs import make_inputs
from vlmopt.machine import check_openvino_device, require_nncf, require_openvino
from vlmopt.options import (
    DEFAULT_MIN_COSINE,
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
from vlmopt.quantization.outliers import LIMIT as OUTLIER_LIMIT
from vlmopt.quantization.outliers import RATIO as OUTLIER_RATIO
from vlmopt.records import TowerRecord, Traits, Verification
from vlmopt.stage import Accepts, Job, Made, Stage, provisional
from vlmopt.workspace import Artifact

MODES = ("fp32", "int8", "int8-weights", "int4-weights")
INFERENCE_PRECISIONS = ("f32", "bf16", "auto")
PERFORMANCE_HINTS = ("latency", "throughput")
BIAS_CORRECTION = ("fast", "full", "off")
#: NNCF's own SmoothQuant alpha for MatMuls of transformer models (AdvancedSmoothQuantParameters.matmul). Not vlmopt's
#: default: on all-MiniLM-L6-v2 it gives cosine min 0.864 fully int8 where off gives 0.954, and 0.830 against 0.987 with
#: the outlier split, which handles the activation outlier channels SmoothQuant moves into the int8 weights (README)
NNCF_SMOOTH_QUANT_ALPHA = 0.95
#: --part modes: NNCF weight compression of one part (a decoder's int4 chosen by --method)
PART_MODES = ("fp32", "int8", "int4")
#: --part decoder=int4: NNCF's data-aware algorithms (compress_weights' awq, scale_estimation, gptq), or rtn (data-free)
DECODER_METHODS = ("awq+scale-estimation", "awq", "scale-estimation", "gptq", "rtn")
#: awq, not awq+scale-estimation: on the real SmolLM2-135M NNCF 3.4's scale estimation took the decoder's top-1 agreement
#: to 0.0015 (data-free int4 0.79, awq 0.875 on one prompt against fp32; the whole gate text: awq 0.759, +17 % perplexity)
DEFAULT_DECODER_METHOD = "awq"
#: int4 group sizes: NNCF's 128 for --mode int4-weights; a decoder part's 32 is quantize's int4 block and GGUF's Q4 block
DEFAULT_GROUP, DECODER_GROUP = 128, 32
_NO_RULE = re.compile(r"No conversion rule found for operations:\s*(.+)")


@dataclass
class OpenVINOOptions(StageOptions):
    source: str = source_option("onnx", "an ONNX artifact (onnx, onnx-opt, a pruned export, ...); its tower interface is kept")
    name: str | None = name_option(None, "openvino, openvino-<mode>, with -<from> when not from onnx")
    mode: str = option(
        "fp32", "fp32 (the graph as is), int8 (NNCF post-training quantization), int8-weights or int4-weights (NNCF weight compression).", choices=MODES
    )
    part: list[str] = option(
        [],
        "Compress one part of a generative model: PART=MODE, repeatable (decoder=int4); int8/int4 are NNCF weight compression, a decoder's "
        "int4 calibrated by --method; parts not named are converted as they are (fp32).",
        metavar="PART=MODE",
    )
    method: str | None = option(
        None,
        f"--part decoder=int4: NNCF's algorithm for the int4 weights: {', '.join(DECODER_METHODS[:-1])} (calibrated on --calib-text, "
        f"else built-in real text the gate does not read) or rtn (data-free). Default: {DEFAULT_DECODER_METHOD}.",
        choices=DECODER_METHODS,
    )
    inference_precision: str = option(
        "f32",
        "How OpenVINO computes the float parts: f32, bf16 (CPUs with AVX512_BF16 or AMX), or auto (OpenVINO's default: bf16 on such CPUs). "
        "Recorded; verification and bench run with it.",
        choices=INFERENCE_PRECISIONS,
    )
    performance_hint: str = option(
        "latency", "latency (one stream, all threads on each request) or throughput (a batch split over OpenVINO's streams).", choices=PERFORMANCE_HINTS
    )
    static_batch: int | None = option(None, "Reshape the IR to this fixed batch (the served batch); other batches are then refused.", minimum=1)
    device: str = option("CPU", "OpenVINO device that verifies and runs the artifact (see `vlmopt doctor`).")
    model_type: str = option(
        "transformer", "int8: NNCF's model type: transformer (its attention/normalization rules, SmoothQuant) or none.", choices=("transformer", "none")
    )
    preset: str = option("mixed", "int8: NNCF preset: mixed (asymmetric activations) or performance (symmetric).", choices=("mixed", "performance"))
    bias_correction: str = option("fast", "int8: NNCF bias correction: fast, full (slower, per layer) or off.", choices=BIAS_CORRECTION)
    smooth_quant: float | None = option(
        None,
        f"int8: SmoothQuant alpha for MatMuls ({NNCF_SMOOTH_QUANT_ALPHA:g} is NNCF's default for transformers); off (the default) leaves the "
        "activation outliers to --split-outliers.",
        minimum=0.0,
        maximum=1.0,
        off=True,
    )
    ignored_names: list[str] = option([], "int8/weights: keep these nodes in float (exact names).", separator=None)
    ignored_patterns: list[str] = option([], "int8/weights: keep nodes whose names match these regular expressions in float.", separator=None)
    ignored_types: list[str] = option([], "int8/weights: keep these OpenVINO operation types in float (e.g. Convolution for the patch embedding).")
    calib_images: str | None = calib_images_option("int8")
    calib_text: str | None = calib_text_option("int8")
    calib_samples: int = calib_samples_option()
    split_outliers: int = option(
        OUTLIER_LIMIT,
        f"int8: per MatMul, up to this many input channels whose calibration range is over {OUTLIER_RATIO:g}x the median channel's "
        "are computed in float beside the int8 MatMul, as in quantize's int8-dynamic (0: none).",
        minimum=0,
    )
    group_size: int | None = option(
        None,
        f"int4-weights and --part ...=int4: weights per quantization group; -1 for one scale per output channel (default: {DEFAULT_GROUP}; "
        f"{DECODER_GROUP} for --part, quantize's int4 block).",
        minimum=-1,
    )
    ratio: float = option(
        1.0,
        "int4-weights and --part ...=int4: share of the weights in int4, the rest int8 (a decoder's chosen by NNCF's sensitivity on the calibration text).",
        minimum=0.0,
        maximum=1.0,
        exclusive=("min",),
    )
    symmetric: bool = option(False, "Weight compression: symmetric (no zero point) instead of asymmetric.", flag="--symmetric/--asymmetric")
    fallback: bool | None = fallback_option("--mode int8")
    fallback_budget: float | None = fallback_budget_option()
    fallback_seconds: float = fallback_seconds_option()
    min_cosine: float | None = min_cosine_option(DEFAULT_MIN_COSINE)
    min_agreement: float | None = min_agreement_option(None)
    eval_images: str | None = eval_images_option()
    eval_text: str | None = eval_text_option()
    min_token_agreement: float | None = min_token_agreement_option(0.90)
    max_ppl_increase: float | None = max_ppl_increase_option(0.05)

    @property
    def parts(self) -> dict[str, str]:
        """--part as {part: mode}, in the order given."""
        from vlmopt.stages.quantize import part_modes

        return part_modes(self.part)

    @property
    def compresses(self) -> bool:
        """Whether NNCF compresses anything (a --mode other than fp32, or a --part mode)."""
        return self.mode != "fp32" or any(mode != "fp32" for mode in self.parts.values())

    @property
    def groups(self) -> int:
        """--group-size, or its default for the mode."""
        if self.group_size is not None:
            return self.group_size
        return DECODER_GROUP if self.part else DEFAULT_GROUP

    @property
    def accuracy_aware(self) -> bool:
        """Whether the fallback runs: --fallback/--no-fallback as given, else on for --mode int8 with a cosine gate."""
        if self.fallback is not None:
            return self.fallback
        return self.mode == "int8" and self.min_cosine is not None

    @property
    def artifact(self) -> str:
        if self.name:
            return self.name
        modes = [f"{name}-{mode}" for name, mode in self.parts.items()] if self.part else ([] if self.mode == "fp32" else [self.mode])
        return "-".join(["openvino"] + ([] if self.source == "onnx" else [self.source]) + modes)

    def check(self) -> None:
        int8 = self.mode == "int8"
        parts = self.parts
        bad = {name: mode for name, mode in parts.items() if mode not in PART_MODES}
        if bad:
            name, mode = next(iter(bad.items()))
            raise VlmoptError(f"--part {name}={mode}: a part takes {', '.join(PART_MODES)} (NNCF weight compression)")
        if parts and self.mode != "fp32":
            raise VlmoptError("--mode sets one mode for every tower and --part one per part; use one of them")
        if parts and set(parts.values()) == {"fp32"}:
            raise VlmoptError("--part leaves every part fp32; name a mode for at least one part (decoder=int4)")
        weights = self.mode in ("int8-weights", "int4-weights") or bool(parts)
        int4 = self.mode == "int4-weights" or "int4" in parts.values()
        if self.method is not None and "int4" not in parts.values():
            raise VlmoptError(f"--method {self.method} chooses a decoder's int4 weights; use it with --part decoder=int4")
        calibrated = int4 and bool(parts) and self.method != "rtn"
        if self.calib_images and not int8:
            raise VlmoptError(f"--calib-images calibrates --mode int8; {self.mode if not parts else '--part'} reads no images")
        if self.calib_text and not (int8 or calibrated):
            raise VlmoptError(
                f"--calib-text calibrates --mode int8 and --part decoder=int4 (not --method rtn); {self.mode if not parts else '--method rtn'} needs no data"
            )
        nncf_int8 = {
            "--model-type": self.model_type != "transformer",
            "--preset": self.preset != "mixed",
            "--bias-correction": self.bias_correction != "fast",
            "--smooth-quant": self.smooth_quant is not None,
        }
        if not int8 and any(nncf_int8.values()):
            raise VlmoptError(f"{', '.join(k for k, v in nncf_int8.items() if v)} apply to --mode int8, not {self.mode}")
        if not (int8 or weights) and (self.ignored_names or self.ignored_patterns or self.ignored_types):
            raise VlmoptError("--ignored-names/--ignored-patterns/--ignored-types choose what NNCF leaves in float; --mode fp32 compresses nothing")
        if self.split_outliers != OUTLIER_LIMIT and not int8:
            raise VlmoptError(f"--split-outliers applies to --mode int8, not {self.mode}")
        if not int4 and (self.group_size is not None or self.ratio != 1.0):
            raise VlmoptError(f"--group-size and --ratio apply to --mode int4-weights and --part ...=int4, not {self.mode}")
        if not weights and self.symmetric:
            raise VlmoptError(f"--symmetric applies to weight compression (int8-weights, int4-weights), not {self.mode}")
        if self.fallback and not int8:
            raise VlmoptError(f"--fallback keeps layers of an NNCF int8 model in float; it applies to --mode int8, not {self.mode}")
        if self.fallback_budget is not None and self.fallback is None and not int8:
            raise VlmoptError(f"--fallback-budget bounds the fallback of --mode int8, not {self.mode}")
        check_budget(self.accuracy_aware, self.fallback_budget)
        if self.fallback and self.min_cosine is None:
            raise VlmoptError("--fallback searches for the fewest float layers that meet --min-cosine; give a threshold instead of off")
        if self.group_size == 0:
            raise VlmoptError("--group-size must be a positive number of weights, or -1 for one scale per output channel")
        if self.smooth_quant is not None and self.model_type != "transformer":
            raise VlmoptError("--smooth-quant is applied by NNCF's transformer model type; add --model-type transformer or drop it")
        for pattern in self.ignored_patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise VlmoptError(f"--ignored-patterns '{pattern}' is not a regular expression: {exc}") from None


# -- OpenVINO and NNCF calls -------------------------------------------------------------------
@contextlib.contextmanager
def quiet_nncf(debug: bool) -> Iterator[None]:
    """NNCF logs at INFO and draws progress bars on stdout; neither is vlmopt's output (stdout carries --json)."""
    if debug:
        yield
        return
    import nncf

    nncf.set_log_level(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def read_onnx(core: Any, path: Path, tower: str, parent: str) -> Any:
    """The ONNX graph (or, from an OpenVINO parent, the IR) as an OpenVINO model; what OpenVINO cannot read is named (operators first)."""
    from vlmopt.runners.openvino_runner import first_line

    try:
        return core.read_model(str(path))
    except RuntimeError as exc:
        unsupported = _NO_RULE.search(str(exc))
        if unsupported:
            ops = unsupported.group(1).strip()
            raise VlmoptError(
                f"OpenVINO cannot read the {tower} tower of '{parent}': it has no conversion rule for operator(s) {ops}; "
                "convert an artifact without them (for example --from onnx)"
            ) from None
        raise VlmoptError(f"OpenVINO cannot read the {tower} tower of '{parent}': {first_line(exc)}") from None


@dataclass
class Ignored:
    """The options' ignored scope as it applies to one tower: the names, patterns and types found in its graph."""

    names: list[str]
    patterns: list[str]
    types: list[str]

    @classmethod
    def in_model(cls, options: OpenVINOOptions, model: Any) -> Ignored:
        ops = [(op.get_friendly_name(), op.get_type_name()) for op in model.get_ordered_ops()]
        names = {name for name, _ in ops}
        kinds = {kind for _, kind in ops}
        return cls(
            [n for n in options.ignored_names if n in names],
            [p for p in options.ignored_patterns if any(re.fullmatch(p, name) for name in names)],
            [t for t in options.ignored_types if t in kinds],
        )

    def scope(self) -> Any:
        import nncf

        if not (self.names or self.patterns or self.types):
            return None
        return nncf.IgnoredScope(names=self.names, patterns=self.patterns, types=self.types, validate=False)


def check_ignored(options: OpenVINOOptions, found: dict[str, Ignored]) -> None:
    """Every ignored name, pattern and type must match in some tower (a typo would silently quantize what it meant to keep)."""
    for flag, wanted, attribute in (
        ("--ignored-names", options.ignored_names, "names"),
        ("--ignored-patterns", options.ignored_patterns, "patterns"),
        ("--ignored-types", options.ignored_types, "types"),
    ):
        unmatched = [w for w in wanted if not any(w in getattr(f, attribute) for f in found.values())]
        if unmatched:
            what = "operation type" if attribute == "types" else "node name"
            raise VlmoptError(f"{flag} {', '.join(unmatched)} matches no {what} in the {'/'.join(found)} tower(s) of the OpenVINO model")


def user_errors() -> tuple[type[BaseException], ...]:
    """What NNCF raises for input a user can fix (its validation, group sizes, parameters, data), and the
    run-time errors OpenVINO raises for data a model cannot take."""
    import nncf.errors as errors

    return (
        errors.ValidationError,
        errors.InvalidGroupSizeError,
        errors.ParameterNotSupportedError,
        errors.UnsupportedModelError,
        errors.UnsupportedDatasetError,
        errors.InvalidQuantizerGroupError,
        RuntimeError,
        ValueError,
    )


def nncf_failure(exc: BaseException, tower: str, what: str) -> VlmoptError:
    """NNCF's validation errors (ignored scopes that match nothing, group sizes that do not divide) and data
    the model cannot take, as one line."""
    from vlmopt.runners.openvino_runner import first_line

    text = str(exc)
    if "incompatible" in text or "Can't set the input tensor" in text:
        return VlmoptError(f"the calibration data does not fit the {tower} tower: {first_line(exc)}")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return VlmoptError(f"NNCF {what} of the {tower} tower failed: {' '.join(lines[:2])[:300] or type(exc).__name__}")


def quantize_int8(model: Any, samples: list[dict[str, np.ndarray]], options: OpenVINOOptions, tower: str, ignored: Ignored) -> tuple[Any, dict[str, Any]]:
    """`nncf.quantize` with the options' preset, model type, bias correction, SmoothQuant alpha and ignored scope."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    alpha = -1.0 if options.smooth_quant is None else options.smooth_quant
    advanced = AdvancedQuantizationParameters(
        smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=alpha),
        disable_bias_correction=options.bias_correction == "off",
    )
    try:
        quantized = nncf.quantize(
            model,
            nncf.Dataset(samples),
            preset=nncf.QuantizationPreset.PERFORMANCE if options.preset == "performance" else nncf.QuantizationPreset.MIXED,
            model_type=nncf.ModelType.TRANSFORMER if options.model_type == "transformer" else None,
            subset_size=len(samples),
            fast_bias_correction=options.bias_correction != "full",
            ignored_scope=ignored.scope(),
            advanced_parameters=advanced,
        )
    except user_errors() as exc:
        raise nncf_failure(exc, tower, "quantization") from None
    details = {
        "preset": options.preset,
        "model_type": options.model_type,
        "bias_correction": options.bias_correction,
        "smooth_quant_alpha": options.smooth_quant,
        "samples": len(samples),
    }
    return quantized, details


def compress_weights(
    model: Any, options: OpenVINOOptions, tower: str, ignored: Ignored, bits: int, samples: list[dict[str, np.ndarray]] | None = None
) -> tuple[Any, dict[str, Any]]:
    """`nncf.compress_weights`: int8 per output channel, or int4 in groups with the rest (1 - ratio) in int8; with
    `samples` (a decoder's calibration prefills) data-aware, by the options' --method (AWQ, scale estimation, GPTQ)."""
    import nncf

    if bits == 8:
        mode = nncf.CompressWeightsMode.INT8_SYM if options.symmetric else nncf.CompressWeightsMode.INT8_ASYM
        kwargs: dict[str, Any] = {}
    else:
        mode = nncf.CompressWeightsMode.INT4_SYM if options.symmetric else nncf.CompressWeightsMode.INT4_ASYM
        kwargs = {"group_size": options.groups, "ratio": options.ratio}
    data: dict[str, Any] = {}
    if samples:
        method = options.method or DEFAULT_DECODER_METHOD
        data = {"dataset": nncf.Dataset(samples), "subset_size": len(samples)}
        data.update(awq="awq" in method, scale_estimation="scale-estimation" in method, gptq=method == "gptq")
    try:
        compressed = nncf.compress_weights(model, mode=mode, ignored_scope=ignored.scope(), **kwargs, **data)
    except user_errors() as exc:
        raise nncf_failure(exc, tower, "weight compression") from None
    details = {"mode": str(mode.value), **kwargs}
    if samples:
        details.update(method=options.method or DEFAULT_DECODER_METHOD, samples=len(samples))
    return compressed, details


def single_samples(feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Calibration batches as one-sample items, so NNCF's subset size counts samples, not batches."""
    return [{name: value[i : i + 1] for name, value in feed.items()} for feed in feeds for i in range(len(next(iter(feed.values()))))]


def static_tower(spec: Tower, batch: int) -> Tower:
    """The tower's interface with every batch axis fixed."""
    return spec.with_static_axes({axis: batch for axis in spec.axes if axis.endswith("batch")})


def reshape_to(model: Any, spec: Tower) -> None:
    """Fix the IR's batch axes as `spec` has them (the other dynamic axes stay dynamic)."""
    import openvino as ov

    shapes = {}
    for tensor in spec.inputs:
        shapes[tensor.name] = ov.PartialShape([d if isinstance(d, int) else -1 for d in tensor.shape])
    try:
        model.reshape(shapes)
    except RuntimeError as exc:
        from vlmopt.runners.openvino_runner import first_line

        raise VlmoptError(f"OpenVINO cannot fix the {spec.name} tower's batch to {spec.inputs[0].shape[0]}: {first_line(exc)}") from None


def name_ports(model: Any, spec: Tower) -> None:
    """Give each input and output exactly the tower's name for it: OpenVINO keeps every name a folded tensor had
    (`pixel_values` and a Cast's output), and a reader of the IR should not have to guess."""
    for ports, tensors in ((model.inputs, spec.inputs), (model.outputs, spec.outputs)):
        for port in ports:
            wanted = next((t.name for t in tensors if t.name in port.get_names()), None)
            if wanted is not None:
                port.get_tensor().set_names({wanted})


def op_counts(model: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind not in ("Constant", "Parameter", "Result"):
            counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))


# -- the stage -------------------------------------------------------------------------------
class OpenVINO(Stage):
    name = "openvino"
    Options = OpenVINOOptions
    produces = "openvino"
    accepts = Accepts(kinds=("onnx", "openvino"), hint="convert an ONNX artifact such as 'onnx' (run `vlmopt convert` first)")
    tools = ("openvino", "nncf", "onnx")
    summary = "Make OpenVINO IR from an ONNX artifact, as is (fp32) or compressed by NNCF (int8, int8/int4 weights); verify it against that artifact."
    details = (
        "Needs OpenVINO and NNCF (pip install 'vlmopt\\[openvino]'); without them it says so and exits 2.\n"
        "Fails with exit 1, writing nothing, when the cosine or zero-shot agreement falls below the thresholds.\n"
        "Example: vlmopt openvino build/clip --mode int8 --inference-precision bf16 --calib-images photos/"
    )

    def artifact_name(self, options: OpenVINOOptions) -> str:
        return options.artifact

    def check_parent(self, parent: Artifact, options: OpenVINOOptions) -> None:
        super().check_parent(parent, options)
        if parent.kind == "openvino" and options.compresses:
            raise VlmoptError(f"'{parent.name}' is already OpenVINO IR; NNCF compresses from the ONNX export: use --from onnx")
        shared = [name for name, record in parent.towers.items() if kv_contract(record.tower) == SHARED]
        if shared:
            raise VlmoptError(
                f"the {shared[0]} of '{parent.name}' is onnxruntime-genai's builder graph (GroupQueryAttention, one shared KV buffer), which "
                "NNCF cannot compress and vlmopt's OpenVINO loop does not run; convert a decoder exported from PyTorch "
                "(`vlmopt convert DIR --decoder torch --name onnx-torch`) and use --from onnx-torch"
            )
        if options.compresses and parent.traits.fused:
            # measured: NNCF 3.4 fails inside its own graph of ORT's com.microsoft Attention ("Could not find a node
            # Gather_... in NNCFGraph"); OpenVINO's CPU plugin fuses attention of the plain export itself.
            raise VlmoptError(
                f"'{parent.name}' is fused by ONNX Runtime's optimizer, which NNCF cannot quantize; use --from onnx "
                "(OpenVINO fuses the attention of the plain export itself)"
            )
        if options.compresses and parent.traits.precision != "fp32":
            raise VlmoptError(f"'{parent.name}' is already {parent.traits.precision}; NNCF compresses fp32 artifacts: use --from onnx")

    def prepare(self, job: Job) -> None:
        options: OpenVINOOptions = job.options
        ov = require_openvino()
        if options.compresses:
            require_nncf(f"--mode {options.mode}" if not options.part else "--part")
        core = ov.Core()
        check_openvino_device(core, options.device)
        job.state.update(core=core, version=ov.get_version().split("-")[0], calibration={}, executed={}, fallback={})
        if options.static_batch is not None:
            fixed = {name: tower.inputs[0].shape[0] for name, tower in job.towers.items() if isinstance(tower.inputs[0].shape[0], int)}
            clash = {name: batch for name, batch in fixed.items() if batch != options.static_batch}
            if clash:
                tower, batch = next(iter(clash.items()))
                raise VlmoptError(f"'{job.parent.name}' has a fixed batch of {batch} ({tower} tower); --static-batch {options.static_batch} cannot change it")
        job.state["models"], job.state["ignored"] = {}, {}
        if options.ignored_names or options.ignored_patterns or options.ignored_types:
            # an ignored scope is checked against every tower's graph before any work (an up-to-date rerun reads none)
            job.state["models"] = {name: read_onnx(core, job.parent_file(name), name, job.parent.name) for name in job.towers}
            job.state["ignored"] = {name: Ignored.in_model(options, model) for name, model in job.state["models"].items()}
            check_ignored(options, job.state["ignored"])
        if options.mode == "int8":
            job.state["calibration_data"] = load_calibration(
                job.model_dir, job.towers, options.calib_images, options.calib_text, options.calib_samples, builtin=True
            )
        job.state["modes"] = self._part_modes(job)

    def _part_modes(self, job: Job) -> dict[str, str]:
        """Each tower's mode (--mode for all, or --part per part); which int4 parts are decoders, and their calibration text read."""
        options: OpenVINOOptions = job.options
        if not options.part:
            return {name: options.mode for name in job.towers}
        parts = options.parts
        unknown = [name for name in parts if name not in job.towers]
        if unknown:
            raise VlmoptError(f"no part named {', '.join(unknown)} in '{job.parent.name}'; the parts are {', '.join(job.towers)}")
        modes = {name: parts.get(name, "fp32") for name in job.towers}
        decoders = [name for name, mode in modes.items() if mode == "int4" and kv_contract(job.towers[name]) is not None]
        others = [name for name, mode in modes.items() if mode == "int4" and name not in decoders]
        if options.method not in (None, "rtn") and others:
            raise VlmoptError(
                f"--method {options.method} calibrates a decoder's MatMuls (a part with a KV cache); the {', '.join(others)} part is not one "
                "(only rtn compresses it); drop --method or name --part decoder=int4"
            )
        job.state["decoders"] = decoders
        if decoders and options.method != "rtn":
            from vlmopt.quantization import int4

            preprocessor = family_named(job.parent.traits.family).preprocessor(job.model_dir.checkpoint_folder(job.parent))
            job.state["calib_text"] = int4.calibration_text(preprocessor.tokenizer, options.calib_text, options.calib_samples)
            job.state["embedding"] = preprocessor.contract.embedding.name
        return modes

    def make_tower(self, job: Job, tower: str, tmp: Path) -> Made:
        import openvino as ov

        options: OpenVINOOptions = job.options
        spec = job.towers[tower]
        mode = job.state["modes"][tower]
        job.say(f"{mode}: the {tower} tower")
        model = job.state["models"].pop(tower, None) or read_onnx(job.state["core"], job.parent_file(tower), tower, job.parent.name)
        ignored = job.state["ignored"].get(tower) or Ignored([], [], [])
        details: dict[str, Any] = {}
        samples = self._calibration(job, spec) if options.mode == "int8" else []
        if samples and options.split_outliers > 0 and job.state["calibration"][tower]["data"] != "synthetic":
            model, split = self._split_outliers(job, tower, samples)
            if split.channels:
                ignored = Ignored(ignored.names + split.fp32_nodes, ignored.patterns, ignored.types)
                job.state.setdefault("outliers", {})[tower] = split.to_json(OUTLIER_RATIO, options.split_outliers, "real calibration data")
        with quiet_nncf(job.context.debug):
            if options.mode == "int8":
                original = model
                model, details = quantize_int8(original.clone(), samples, options, tower, ignored)
                if options.accuracy_aware:
                    model = self._fallback(job, spec, original, model, samples, ignored)
            elif mode in ("int8-weights", "int8"):
                model, details = compress_weights(model, options, tower, ignored, bits=8)
            elif mode in ("int4-weights", "int4"):
                samples = self._decoder_calibration(job, tower) if tower in job.state.get("decoders", ()) and options.method != "rtn" else None
                model, details = compress_weights(model, options, tower, ignored, bits=4, samples=samples)
        if ignored.scope() is not None:
            details["ignored"] = dataclasses.asdict(ignored)
        if tower in job.state.get("outliers", {}):
            details["outlier_channels"] = job.state["outliers"][tower]
        if options.static_batch is not None:
            spec = static_tower(spec, options.static_batch)
            reshape_to(model, spec)
        name_ports(model, spec)
        file = f"{tower}.xml"
        ov.save_model(model, str(tmp / file), compress_to_fp16=False)
        meta = {
            "openvino": job.state["version"],
            "device": options.device,
            "inference_precision": options.inference_precision,
            "performance_hint": options.performance_hint,
            "static_batch": options.static_batch,
        }
        size = sum(p.stat().st_size for p in (tmp / file, tmp / f"{tower}.bin") if p.exists())
        work = {"op_counts": op_counts(model), "parent_size": sum(f.size for f in job.parent.tower_files(tower))}
        if details:
            work["compression"] = details
        return Made(TowerRecord(spec, file, size, engine=meta), work)

    def _split_outliers(self, job: Job, tower: str, samples: list[dict[str, np.ndarray]]) -> tuple[Any, Any]:
        """The tower's ONNX graph with the outlier input channels of its MatMuls split out into float MatMuls (chosen on
        the calibration `samples`, `vlmopt.quantization.outliers`), read by OpenVINO; the float MatMuls go into NNCF's
        ignored scope."""
        import tempfile

        from vlmopt import graph
        from vlmopt.quantization import outliers

        options: OpenVINOOptions = job.options
        model = graph.load(job.parent_file(tower))
        del model.graph.value_info[:]
        split = outliers.split(model, outliers.channel_ranges(model, samples, job.context.thread_count), OUTLIER_RATIO, options.split_outliers)
        with tempfile.TemporaryDirectory(prefix="vlmopt-openvino-") as folder:
            path = Path(folder) / job.parent_file(tower).name
            graph.save(model, path)
            del model
            # OpenVINO holds the weights it read (a mapped file outlives its name on POSIX)
            return read_onnx(job.state["core"], path, tower, job.parent.name), split

    def _fallback(self, job: Job, spec: Tower, original: Any, quantized: Any, samples: list[dict[str, np.ndarray]], ignored: Ignored) -> Any:
        """The fewest most sensitive layers in NNCF's ignored scope for --min-cosine on the gated real data, searched on one
        half and judged on the other (`vlmopt.quantization.accuracy`); exit 1 with the best found when the budget cannot reach it."""
        from vlmopt.quantization import accuracy
        from vlmopt.quantization import openvino_fallback as ovf
        from vlmopt.runners import OrtRunner
        from vlmopt.runners.openvino_runner import compile_config
        from vlmopt.verification.check import evaluation_sets

        options: OpenVINOOptions = job.options
        assert options.min_cosine is not None
        threads = job.context.thread_count
        meta = {"inference_precision": options.inference_precision, "performance_hint": options.performance_hint}
        core = job.state["core"]

        def requantize(kept: list[str]) -> Any:
            scope = Ignored(ignored.names + kept, ignored.patterns, ignored.types)
            return quantize_int8(original.clone(), samples, options, spec.name, scope)[0]

        tier = "float (f32)" if options.inference_precision == "f32" else f"float ({options.inference_precision})"
        backend = ovf.IgnoredScopeBackend(
            quantized,
            original,
            requantize,
            ovf.compiler(core, options.device, compile_config(meta, threads)),
            ovf.compiler(core, options.device, compile_config(meta, threads, profile=True)),
            tier,
        )
        feeds = [feed for s in evaluation_sets(spec, job.state.get("data")) if s.gated for feed in s.feeds]
        with OrtRunner(job.parent_file(spec.name), threads=threads) as parent:
            outcome = accuracy.run(
                spec.name,
                backend,
                feeds,
                lambda feed: {k: np.array(v, copy=True) for k, v in parent.run(feed).items()},
                options.min_cosine,
                options.fallback_budget,
                options.fallback_seconds,
                job.say,
                fixed_batch=isinstance(spec.inputs[0].shape[0], int),
                fixed_sequence=any(isinstance(d, int) for s in spec.inputs if s.role == "input_ids" for d in s.shape[1:]),
            )
        state = job.state["fallback"]
        state.setdefault("gate", {"min_cosine": options.min_cosine, "data": "the gated real data: searched on even rows, judged on odd ones"})
        state.setdefault("towers", {})[spec.name] = outcome.to_json()
        state["needed"] = state.get("needed", False) or outcome.needed
        if not outcome.passed:
            raise CheckFailed(
                accuracy.failure(spec.name, outcome, options.min_cosine, "int8")
                + "; most sensitive layers (relative output error when quantized alone): "
                + ", ".join(f"{r['node']} {r['sensitivity']:.3g}" for r in outcome.top_sensitive[:5])
                + "; nothing was written",
                details={"fallback": dict(state)},
            )
        if outcome.needed:
            job.say(accuracy.summary(spec.name, state["towers"][spec.name]))
        return outcome.model

    def _decoder_calibration(self, job: Job, tower: str) -> list[dict[str, np.ndarray]]:
        """Prefills of the calibration text's windows into the decoder, embedded by the parent's own embedding part."""
        from vlmopt.quantization import int4
        from vlmopt.runners.generate import ort_session

        calib, embedding = job.state["calib_text"], job.state["embedding"]
        threads = job.context.thread_count
        job.say(f"calibration: {len(calib.windows)} windows of {int4.CALIB_WINDOW} tokens of {calib.source}")
        feeds = int4.decoder_feeds(ort_session(job.parent_file(embedding), threads), ort_session(job.parent_file(tower), threads), calib.windows)
        job.state["calibration"][tower] = {"data": "real", "source": calib.source, "samples": len(feeds), "window": int4.CALIB_WINDOW}
        return feeds

    def _calibration(self, job: Job, spec: Tower) -> list[dict[str, np.ndarray]]:
        options: OpenVINOOptions = job.options
        feeds, origin = calibration_feeds(spec, job.state["calibration_data"], options.calib_samples)
        samples = single_samples(feeds)[: options.calib_samples]
        if origin == "synthetic":
            job.warn(synthetic_warning(spec, len(samples)))
        job.state["calibration"][spec.name] = {
            "data": origin,
            "source": calibration_source(spec, job.state["calibration_data"]) or "random inputs",
            "samples": sample_count(samples),
        }
        return samples

    def verify(self, job: Job, tmp: Path, towers: dict[str, TowerRecord]) -> Verification | None:
        """Against the parent through ONNX Runtime, recording what the compiled OpenVINO model actually ran."""
        from vlmopt.runners import ArtifactRunners
        from vlmopt.verification import Gates, verify_runners
        from vlmopt.verification.check import FeedSet, evaluation_sets

        options: OpenVINOOptions = job.options
        candidate = provisional(self, job, tmp, towers)
        executed = job.state["executed"]

        def sets(tower: Tower) -> list[FeedSet]:
            if options.static_batch is None:
                return evaluation_sets(tower, job.state.get("data"))
            sequence = min(16, tower.vocab.max_length) if tower.vocab else 1
            sizes = {"batch": options.static_batch, "image_batch": options.static_batch, "text_batch": options.static_batch, "sequence": sequence}
            feeds = [make_inputs(tower, sizes, seed=100 + i) for i in range(2)]
            return [FeedSet("synthetic", "random inputs", feeds)]

        job.say(f"verifying against '{job.parent.name}'")
        with (
            ArtifactRunners(job.parent_dir, job.parent, threads=job.context.thread_count) as references,
            ArtifactRunners(tmp, candidate, threads=job.context.thread_count) as candidates,
        ):

            def opened(tower: Tower) -> Any:
                runner = candidates.runner(tower)
                executed[tower.name] = runner.details()
                return runner

            specs = {name: record.tower for name, record in towers.items()}
            # a fixed served batch takes none of the real sets' batch sizes: it is checked on synthetic inputs of its batch
            data = job.state.get("data") if options.static_batch is None else None
            gates = Gates.of(options)
            family = family_named(job.parent.traits.family)
            extra = None
            if family is not None and family.generative:
                from vlmopt.verification.generation import variant_checks

                preprocessor = family.preprocessor(job.model_dir.checkpoint_folder(job.parent))
                threads = job.context.thread_count
                extra = lambda: ({}, variant_checks(preprocessor, job.parent_dir, job.parent, tmp, candidate, gates, threads, job.say))  # noqa: E731
            return verify_runners(specs, references.runner, opened, gates, job.parent.name, sets=sets, data=data, extra=extra)

    def traits(self, job: Job, made: dict[str, Made]) -> Traits:
        options: OpenVINOOptions = job.options
        if options.part:
            precision = ",".join(f"{name}={mode}" for name, mode in options.parts.items())
        else:
            precision = job.parent.traits.precision if options.mode == "fp32" else options.mode
        return job.parent.traits.derive(precision=precision, target="cpu", fused=False, ort_only_ops=[])

    def record(self, job: Job, made: dict[str, Made]) -> dict[str, Any]:
        record = super().record(job, made)
        record["openvino_version"] = job.state["version"]
        #: what the compiled model ran while it was verified: OpenVINO's precision hint as read back, layer precisions
        record["executed"] = job.state["executed"]
        if job.state["calibration"]:
            record["calibration"] = job.state["calibration"]
        if job.state["fallback"]:
            record["fallback"] = job.state["fallback"]
        return record

    def describe(self, artifact: Artifact) -> list[Any]:
        lines = []
        for tower, executed in (artifact.record.get("executed") or {}).items():
            if not executed:
                continue
            compute = ", ".join(f"{kind} {'/'.join(f'{p}×{n}' for p, n in counts.items())}" for kind, counts in executed["layers"].items() if kind in _SHOWN)
            requested = artifact.towers[tower].engine.get("inference_precision") if artifact.towers[tower].engine else None
            lines.append(f"ran ({tower}): inference precision {executed['inference_precision']} (asked: {requested}); {escape(compute)}")
        for tower, info in (artifact.record.get("calibration") or {}).items():
            label = "[bold yellow]SYNTHETIC[/]" if info["data"] == "synthetic" else f"real ({escape(info.get('source', 'real'))})"
            unit = f"windows of {info['window']} tokens" if "window" in info else "samples"
            lines.append(f"calibration of {tower}: {info['samples']} {unit}, {label}")
        for tower, work in (artifact.record.get("towers") or {}).items():
            compression = work.get("compression") or {}
            if "method" in compression:
                lines.append(
                    f"{tower}: {compression['mode']}, groups of {compression['group_size']}, ratio {compression['ratio']:g}, NNCF {compression['method']}"
                )
        for tower, info in ((artifact.record.get("fallback") or {}).get("towers") or {}).items():
            lines.append(escape(summary(tower, info)))
            for layer in info.get("kept", []):
                cost = f", costs {layer['cost_ms']:+.2f} ms" if "cost_ms" in layer else ""
                lines.append(f"  kept: {escape(layer['node'])} ({layer['op']}, sensitivity {layer['sensitivity']:.3g}{cost})")
        return lines


#: the compute layers `describe` lists with the precisions they ran in
_SHOWN = ("FullyConnected", "MatMul", "Convolution", "Subgraph", "ScaledDotProductAttention", "MVN", "Softmax")


STAGE = OpenVINO()
