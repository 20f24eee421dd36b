"""`vlmopt quantize`: fp16, INT8 (dynamic; static for CPU or TensorRT) and INT4 variants, each verified against its fp32 parent."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import Result
from onnx import TensorProto, numpy_helper

from conftest import TOWERS, assert_bad_input, leftovers, manifest, snapshot, vlmopt, vlmopt_json
from vlmopt.stages.quantize import MIN_COSINE

CLIP_TOWERS = TOWERS["clip"]
#: artifact name -> the flags that make it. int4 misses cosine 0.99 on the random-weight text tower (README); int8-static
#: is calibrated on the built-in photos and prose, and its gate is lowered for the random weights
VARIANTS = {
    "fp16": ("--mode", "fp16"),
    "int8-dynamic": ("--mode", "int8-dynamic"),
    "int8-static": ("--mode", "int8-static", "--min-cosine", "0.95"),
    "int8-static-trt": ("--mode", "int8-static", "--target", "tensorrt", "--min-cosine", "0.95"),
    "int8-weights": ("--mode", "int8-weights"),
    "int4": ("--mode", "int4", "--min-cosine", "0.9"),
}
PRECISION = {
    "fp16": "fp16",
    "int8-dynamic": "int8-dynamic",
    "int8-static": "int8-static",
    "int8-static-trt": "int8-static",
    "int8-weights": "int8-weights",
    "int4": "int4",
}
PROMPTS = [
    "a photo of a cat",
    "a photo of a dog",
    "a red car on the street",
    "a small bird in the sky",
    "a horse near the river",
    "a ship at sunset",
    "a drawing of a frog",
    "a man with a dog on the beach",
]
QUICK_BENCH = ("--iterations", "1", "--warmup", "0", "--batch", "1")
#: what a variant's graph computes with when an op was quantized
QUANTIZED_OPS = ("MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "QuantizeLinear", "MatMulNBits", "QAttention", "QGemm")


# -- helpers --------------------------------------------------------------------------------------
def _graph(model_dir: Path, artifact: str, tower: str) -> onnx.ModelProto:
    return onnx.load(model_dir / artifact / f"{tower}.onnx")


def _count(model: onnx.ModelProto) -> Counter[str]:
    return Counter(node.op_type for node in model.graph.node)


def _weight_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMul nodes that multiply by a weight (an initializer), as quantizers see them."""
    initializers = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and any(i in initializers for i in n.input)]


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor of the graph, by shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    return types


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def _zero_points(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    initializers = {i.name: i for i in model.graph.initializer}
    return [
        initializers[n.input[2]]
        for n in model.graph.node
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2] in initializers
    ]


def _write_images(folder: Path, seed: int = 0, count: int = 4) -> Path:
    """`count` small noise images of other sizes than the model's (the processor resizes them), the last one a JPEG."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        image = Image.fromarray(rng.integers(0, 256, (32 + 8 * (i % 4), 40, 3), dtype=np.uint8))
        image.save(folder / (f"image{i}.jpg" if i == count - 1 else f"image{i}.png"))
    return folder


def _write_prompts(path: Path, prompts: list[str] = PROMPTS) -> Path:
    path.write_text("\n".join(prompts) + "\n")
    return path


# -- one directory with every variant, made once ---------------------------------------------------
@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory, converted: Callable[[str], Path]) -> tuple[Path, dict[str, Result]]:
    """(model directory, the CLI result per artifact) of the tiny CLIP quantized in every mode, each with --json."""
    model_dir = tmp_path_factory.mktemp("variants") / "clip"
    shutil.copytree(converted("clip"), model_dir)
    results = {}
    for name, flags in VARIANTS.items():
        results[name] = vlmopt("quantize", model_dir, *flags, "--json")
        assert results[name].exit_code == 0, f"{name}: exit {results[name].exit_code}: {results[name].stderr}"
    return model_dir, results


def _artifact(variants: tuple[Path, dict[str, Result]], name: str) -> dict[str, Any]:
    return json.loads(variants[1][name].stdout)["artifact"]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_quantize_writes_one_graph_per_tower_under_the_default_artifact_name(name: str, variants: tuple[Path, dict[str, Result]]) -> None:
    model_dir, _ = variants

    assert sorted(p.name for p in (model_dir / name).glob("*.onnx")) == ["text.onnx", "vision.onnx"]
    assert manifest(model_dir)["artifacts"][name]["stage"] == "quantize"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_quantized_artifact_records_its_precision(name: str, variants: tuple[Path, dict[str, Result]]) -> None:
    assert _artifact(variants, name)["traits"]["precision"] == PRECISION[name]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_quantized_artifact_records_the_fp32_onnx_export_as_its_parent(name: str, variants: tuple[Path, dict[str, Result]]) -> None:
    model_dir, _ = variants
    artifact = _artifact(variants, name)

    assert artifact["parent"] == "onnx"
    assert artifact["parent_digest"] == manifest(model_dir)["artifacts"]["onnx"]["digest"]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_quantized_artifact_records_the_sizes_of_its_graphs_and_of_its_parents(name: str, variants: tuple[Path, dict[str, Result]]) -> None:
    model_dir, _ = variants

    artifact = _artifact(variants, name)
    for tower, recorded in artifact["towers"].items():
        assert recorded["size"] == (model_dir / name / f"{tower}.onnx").stat().st_size
        assert artifact["record"]["towers"][tower]["parent_size"] == (model_dir / "onnx" / f"{tower}.onnx").stat().st_size


@pytest.mark.parametrize("name", ["fp16", "int8-dynamic", "int8-weights", "int4"])
def test_fp16_int8_dynamic_int8_weights_and_int4_graphs_are_smaller_than_the_fp32_ones(name: str, variants: tuple[Path, dict[str, Result]]) -> None:
    artifact = _artifact(variants, name)
    for tower, recorded in artifact["towers"].items():
        assert recorded["size"] < artifact["record"]["towers"][tower]["parent_size"], tower


@pytest.mark.parametrize("name", list(VARIANTS))
def test_quantized_artifact_records_the_operator_counts_of_its_graphs(name: str, variants: tuple[Path, dict[str, Result]]) -> None:
    model_dir, _ = variants

    for tower, recorded in _artifact(variants, name)["record"]["towers"].items():
        assert recorded["op_counts"] == dict(_count(_graph(model_dir, name, tower))), tower


@pytest.mark.parametrize("name", list(VARIANTS))
def test_quantized_artifact_records_passed_verification_with_cosine_per_tower_output(name: str, variants: tuple[Path, dict[str, Result]]) -> None:
    verification = _artifact(variants, name)["verification"]

    assert verification["passed"] is True
    assert verification["reference"] == "onnx"
    assert sorted(verification["towers"]) == ["text", "vision"]
    for checks in verification["towers"].values():
        for check in checks:
            assert check["outputs"], check
            for output in check["outputs"].values():
                assert {"cosine_min", "cosine_mean", "max_abs_diff"} <= set(output), output
                assert output["cosine_min"] <= output["cosine_mean"] <= 1 + 1e-9, output
                if check["gated"]:
                    assert verification["gates"]["min_cosine"] <= output["cosine_min"], output
                    assert output["passed"] is True


@pytest.mark.parametrize("name", list(VARIANTS))
def test_quantized_clip_records_the_zero_shot_agreement_with_its_parent(name: str, variants: tuple[Path, dict[str, Result]]) -> None:
    (zero_shot,) = _artifact(variants, name)["verification"]["metrics"]

    assert zero_shot["name"] == "zero-shot top-1 agreement"
    assert 0 <= zero_shot["value"] <= 1
    assert zero_shot["detail"]["images"] > 1 and zero_shot["detail"]["prompts"] > 1


# -- int8-dynamic and int4: ONNX Runtime's integer operators ----------------------------------------
@pytest.mark.parametrize("tower", CLIP_TOWERS)
def test_int8_dynamic_multiplies_every_weight_with_matmulinteger(
    tower: str, variants: tuple[Path, dict[str, Result]], converted: Callable[[str], Path]
) -> None:
    model_dir, _ = variants
    counts = _count(_graph(model_dir, "int8-dynamic", tower))

    assert counts["MatMulInteger"] == len(_weight_matmuls(onnx.load(converted("clip") / "onnx" / f"{tower}.onnx")))
    assert counts["DynamicQuantizeLinear"] > 0


def test_int8_dynamic_weights_are_7_bit_exactly_where_this_cpus_int8_sums_saturate(variants: tuple[Path, dict[str, Result]]) -> None:
    from vlmopt.machine import int8_sums_saturate

    model = onnx.load(str(variants[0] / "int8-dynamic" / "vision.onnx"))
    widest = max(int(np.abs(numpy_helper.to_array(t).astype(np.int32)).max()) for t in model.graph.initializer if t.data_type == TensorProto.INT8)
    record = manifest(variants[0])["artifacts"]["int8-dynamic"]["record"]["towers"]["vision"]["quantization"]

    assert (widest <= 64) == int8_sums_saturate()
    assert ("reduce_range" in record) == int8_sums_saturate()


@pytest.mark.parametrize("tower", CLIP_TOWERS)
def test_int8_dynamic_computes_the_outlier_channels_it_recorded_in_fp32_matmuls(tower: str, variants: tuple[Path, dict[str, Result]]) -> None:
    record = manifest(variants[0])["artifacts"]["int8-dynamic"]["record"]["towers"][tower]["quantization"]["outlier_channels"]
    model = _graph(variants[0], "int8-dynamic", tower)
    initializers = {i.name: i for i in model.graph.initializer}
    fp32 = {n.name: n for n in model.graph.node if n.op_type == "MatMul"}

    assert record["data"] == "real calibration data"
    assert record["matmuls"] == len(record["per_matmul"])
    for node, channels in record["per_matmul"].items():
        assert 0 < len(channels) <= 4
        assert initializers[fp32[f"{node}/outlier_channels"].input[1]].dims[0] == len(channels)


def test_int8_dynamic_keeps_the_patch_embedding_conv_float(variants: tuple[Path, dict[str, Result]]) -> None:
    counts = _count(_graph(variants[0], "int8-dynamic", "vision"))

    assert counts["Conv"] == 1
    assert counts["ConvInteger"] == 0


@pytest.mark.parametrize("tower", CLIP_TOWERS)
def test_int4_replaces_every_weight_matmul_with_matmulnbits(tower: str, variants: tuple[Path, dict[str, Result]], converted: Callable[[str], Path]) -> None:
    model = _graph(variants[0], "int4", tower)
    weight_matmuls = _weight_matmuls(onnx.load(converted("clip") / "onnx" / f"{tower}.onnx"))

    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == len(weight_matmuls)
    assert {n.domain for n in nbits} == {"com.microsoft"}
    assert _weight_matmuls(model) == []


@pytest.mark.parametrize("name", ["int8-dynamic", "int8-weights", "int4"])
def test_onnxruntime_only_variants_are_recorded_as_not_tensorrt_ready(name: str, variants: tuple[Path, dict[str, Result]]) -> None:
    for tower, issue in _artifact(variants, name)["traits"]["tensorrt_issues"].items():
        assert issue, tower


# -- int8-static for TensorRT: symmetric INT8 Q/DQ on MatMul/Gemm, fp32 bias -------------------------
@pytest.mark.parametrize("tower", CLIP_TOWERS)
def test_tensorrt_int8_zero_points_are_all_int8_zeros(tower: str, variants: tuple[Path, dict[str, Result]]) -> None:
    zero_points = _zero_points(_graph(variants[0], "int8-static-trt", tower))

    assert zero_points
    assert {z.data_type for z in zero_points} == {TensorProto.INT8}
    assert not any(numpy_helper.to_array(z).any() for z in zero_points)


@pytest.mark.parametrize("tower", CLIP_TOWERS)
def test_tensorrt_int8_has_no_int32_dequantization_of_a_quantized_bias(tower: str, variants: tuple[Path, dict[str, Result]]) -> None:
    model = _graph(variants[0], "int8-static-trt", tower)
    initializers = {i.name: i for i in model.graph.initializer}

    dequantized = [initializers[n.input[0]] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in initializers]
    assert dequantized
    assert {t.data_type for t in dequantized} == {TensorProto.INT8}


@pytest.mark.parametrize("tower", CLIP_TOWERS)
def test_tensorrt_int8_feeds_every_matmul_the_fallback_kept_no_other_way_through_dequantizelinear(tower: str, variants: tuple[Path, dict[str, Result]]) -> None:
    model = _graph(variants[0], "int8-static-trt", tower)
    producers = {out: node for node in model.graph.node for out in node.output}
    fallback = manifest(variants[0])["artifacts"]["int8-static-trt"]["record"].get("fallback") or {}
    kept = {k["node"] for k in (fallback.get("towers") or {}).get(tower, {}).get("kept", [])}

    matmuls = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.name not in kept]
    assert matmuls
    for node in matmuls:
        assert [producers[i].op_type for i in node.input[:2]] == ["DequantizeLinear"] * 2, node.name


@pytest.mark.parametrize("tower", CLIP_TOWERS)
def test_tensorrt_int8_places_qdq_only_on_matmul_and_gemm_inputs(tower: str, variants: tuple[Path, dict[str, Result]]) -> None:
    model = _graph(variants[0], "int8-static-trt", tower)
    readers = _consumers(model)

    outside = {
        n.name: sorted({r.op_type for r in readers.get(n.output[0], [])})
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and not any(r.op_type in ("MatMul", "Gemm") for r in readers.get(n.output[0], []))
    }
    assert outside == {}


@pytest.mark.parametrize("name", ["int8-static", "int8-static-trt"])
def test_int8_static_tower_outputs_are_not_rounded_to_int8(name: str, variants: tuple[Path, dict[str, Result]]) -> None:
    for tower in CLIP_TOWERS:
        model = _graph(variants[0], name, tower)
        producers = {out: node for node in model.graph.node for out in node.output}
        for output in model.graph.output:
            assert producers[output.name].op_type != "DequantizeLinear", (tower, output.name)


def test_tensorrt_int8_is_recorded_as_tensorrt_ready(variants: tuple[Path, dict[str, Result]]) -> None:
    artifact = _artifact(variants, "int8-static-trt")

    assert artifact["traits"]["target"] == "tensorrt"
    assert artifact["traits"]["tensorrt_issues"] == {"vision": None, "text": None}


def test_tensorrt_int8_records_symmetric_int8_activations_and_fp32_bias(variants: tuple[Path, dict[str, Result]]) -> None:
    for recorded in _artifact(variants, "int8-static-trt")["record"]["towers"].values():
        quantization = recorded["quantization"]
        assert quantization["format"] == "QDQ"
        assert quantization["activations"] == "int8 symmetric"
        assert quantization["bias"] == "fp32"
        assert quantization["op_types"] == ["MatMul", "Gemm"]


def test_cpu_int8_static_is_recorded_as_not_tensorrt_ready_for_its_unsigned_activations(variants: tuple[Path, dict[str, Result]]) -> None:
    for tower, issue in _artifact(variants, "int8-static")["traits"]["tensorrt_issues"].items():
        assert "asymmetric or unsigned" in issue, tower


@pytest.mark.parametrize("tower", CLIP_TOWERS)
def test_cpu_int8_static_quantizes_activations_to_uint8(tower: str, variants: tuple[Path, dict[str, Result]]) -> None:
    zero_points = _zero_points(_graph(variants[0], "int8-static", tower))

    assert TensorProto.UINT8 in {z.data_type for z in zero_points}


def test_fp16_from_the_plain_export_is_recorded_as_tensorrt_ready(variants: tuple[Path, dict[str, Result]]) -> None:
    for tower, issue in _artifact(variants, "fp16")["traits"]["tensorrt_issues"].items():
        assert issue is None, (tower, issue)


# -- fp16: the overflow-prone ops stay fp32 ---------------------------------------------------------
@pytest.mark.parametrize("tower", CLIP_TOWERS)
@pytest.mark.parametrize("op_type", ["LayerNormalization", "Softmax"])
def test_fp16_computes_normalization_and_softmax_in_float32(op_type: str, tower: str, variants: tuple[Path, dict[str, Result]]) -> None:
    model = _graph(variants[0], "fp16", tower)
    types = _elem_types(model)

    nodes = [n for n in model.graph.node if n.op_type == op_type]
    assert nodes
    for node in nodes:
        assert [types[i] for i in node.input if i] == [TensorProto.FLOAT] * len([i for i in node.input if i]), node.name
        assert types[node.output[0]] == TensorProto.FLOAT, node.name


@pytest.mark.parametrize("tower", CLIP_TOWERS)
def test_fp16_computes_matmuls_in_float16(tower: str, variants: tuple[Path, dict[str, Result]]) -> None:
    model = _graph(variants[0], "fp16", tower)
    types = _elem_types(model)

    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert matmuls
    assert {types[i] for n in matmuls for i in n.input} == {TensorProto.FLOAT16}


def test_fp16_keeps_graph_inputs_and_outputs_float32_by_default(variants: tuple[Path, dict[str, Result]], converted: Callable[[str], Path]) -> None:
    def io(graph: onnx.GraphProto) -> list[tuple[str, int]]:
        return [(v.name, v.type.tensor_type.elem_type) for v in (*graph.input, *graph.output)]

    for tower in CLIP_TOWERS:
        fp16 = _graph(variants[0], "fp16", tower).graph
        assert io(fp16) == io(onnx.load(converted("clip") / "onnx" / f"{tower}.onnx").graph), tower
        assert TensorProto.FLOAT16 not in {t for _, t in io(fp16)}, tower


def test_fp16_exclude_op_types_keeps_those_ops_in_float32(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    """CLIP's quick_gelu exports as x * Sigmoid(1.702 x): Sigmoid is an op the default list converts."""
    model_dir = copy_model_dir(converted("clip"))

    artifact = vlmopt_json("quantize", model_dir, "--mode", "fp16", "--exclude-op-types", "Sigmoid", "--name", "fp16-sigmoid")["artifact"]

    for tower in CLIP_TOWERS:
        model = _graph(model_dir, "fp16-sigmoid", tower)
        types = _elem_types(model)
        sigmoids = [n for n in model.graph.node if n.op_type == "Sigmoid"]
        assert sigmoids, tower
        assert {types[n.input[0]] for n in sigmoids} == {TensorProto.FLOAT}, tower
        assert "Sigmoid" in artifact["record"]["towers"][tower]["quantization"]["kept_fp32_ops"]


def test_fp16_converts_sigmoid_by_default(variants: tuple[Path, dict[str, Result]]) -> None:
    model = _graph(variants[0], "fp16", "vision")
    types = _elem_types(model)

    assert {types[n.input[0]] for n in model.graph.node if n.op_type == "Sigmoid"} == {TensorProto.FLOAT16}


def test_fp16_io_makes_float16_image_inputs_and_still_verifies(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("clip"))

    result = vlmopt("quantize", model_dir, "--mode", "fp16", "--fp16-io", "--name", "fp16-io", "--json")

    assert result.exit_code == 0, result.output
    (pixel_values,) = _graph(model_dir, "fp16-io", "vision").graph.input
    assert pixel_values.type.tensor_type.elem_type == TensorProto.FLOAT16


# -- int8-static calibration data ------------------------------------------------------------------
@pytest.fixture(scope="module")
def calibration_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a folder of four small images, a file of eight prompts)."""
    root = tmp_path_factory.mktemp("calibration")
    return _write_images(root / "images"), _write_prompts(root / "prompts.txt")


@pytest.fixture(scope="module")
def real_calibrated(tmp_path_factory: pytest.TempPathFactory, converted: Callable[[str], Path], calibration_files: tuple[Path, Path]) -> Result:
    """The CLI result of int8-static of the tiny CLIP calibrated on the images and prompts (a lower gate: random weights)."""
    images, prompts = calibration_files
    model_dir = tmp_path_factory.mktemp("real-calibration") / "clip"
    shutil.copytree(converted("clip"), model_dir)
    result = vlmopt("quantize", model_dir, "--mode", "int8-static", "--calib-images", images, "--calib-text", prompts, "--min-cosine", "0.95", "--json")
    assert result.exit_code == 0, result.stderr
    return result


def test_int8_static_with_images_and_prompts_records_real_calibration_for_both_towers(real_calibrated: Result) -> None:
    calibration = json.loads(real_calibrated.stdout)["artifact"]["record"]["calibration"]

    assert {t: (c["data"], c["samples"]) for t, c in calibration.items()} == {"vision": ("real", 4), "text": ("real", len(PROMPTS))}


def test_int8_static_with_real_data_gives_no_synthetic_warning(real_calibrated: Result) -> None:
    assert "SYNTHETIC" not in real_calibrated.stderr


def test_int8_static_is_verified_on_the_evaluation_data_not_on_its_calibration_samples(real_calibrated: Result) -> None:
    verification = json.loads(real_calibrated.stdout)["artifact"]["verification"]

    sources = {t: [c["source"] for c in checks if c["data"] == "real"] for t, checks in verification["towers"].items()}
    assert sources == {"vision": ["built-in photos"], "text": ["built-in sentences"]}
    (zero_shot,) = verification["metrics"]
    assert zero_shot["data"] == "10 images (real) x 16 prompts (real)"


def test_int8_static_without_data_calibrates_on_the_built_in_photos_and_prose(variants: tuple[Path, dict[str, Result]]) -> None:
    calibration = _artifact(variants, "int8-static")["record"]["calibration"]

    assert {t: (c["data"], c["source"]) for t, c in calibration.items()} == {"vision": ("real", "built-in photos"), "text": ("real", "built-in prose")}


def test_int8_static_with_the_built_in_data_gives_no_synthetic_warning(variants: tuple[Path, dict[str, Result]]) -> None:
    assert "SYNTHETIC" not in variants[1]["int8-static"].stderr


def test_int8_static_calibrates_on_at_most_calib_samples(
    converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path], calibration_files: tuple[Path, Path]
) -> None:
    images, prompts = calibration_files
    model_dir = copy_model_dir(converted("clip"))

    artifact = vlmopt_json(
        "quantize", model_dir, "--mode", "int8-static", "--calib-images", images, "--calib-text", prompts, "--calib-samples", "2", "--min-cosine", "0.9"
    )["artifact"]

    assert {t: c["samples"] for t, c in artifact["record"]["calibration"].items()} == {"vision": 2, "text": 2}


def test_entropy_calibration_chooses_other_ranges_than_minmax(variants: tuple[Path, dict[str, Result]], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(variants[0])

    # entropy clips the synthetic set's tails: the tiny text tower lands near cosine 0.97, so the gate is lowered here
    vlmopt_json("quantize", model_dir, "--mode", "int8-static", "--calib-method", "entropy", "--name", "int8-entropy", "--min-cosine", "0.9")

    def scales(artifact: str) -> dict[str, float]:
        model = _graph(model_dir, artifact, "text")
        initializers = {i.name: i for i in model.graph.initializer}
        return {n.name: float(numpy_helper.to_array(initializers[n.input[1]])) for n in model.graph.node if n.op_type == "QuantizeLinear"}

    assert scales("int8-entropy") != scales("int8-static")


def test_percentile_calibration_on_the_built_in_data_chooses_other_ranges_than_minmax(
    variants: tuple[Path, dict[str, Result]], copy_model_dir: Callable[[Path], Path]
) -> None:
    model_dir = copy_model_dir(variants[0])

    vlmopt_json(
        "quantize", model_dir, "--mode", "int8-static", "--calib-method", "percentile", "--percentile", "99.9", "--name", "int8-pct", "--min-cosine", "0.9"
    )

    def scales(artifact: str) -> dict[str, float]:
        model = _graph(model_dir, artifact, "text")
        initializers = {i.name: i for i in model.graph.initializer}
        return {n.name: float(numpy_helper.to_array(initializers[n.input[1]])) for n in model.graph.node if n.op_type == "QuantizeLinear"}

    assert scales("int8-pct") != scales("int8-static")


# -- thresholds: exit 1 and nothing written ---------------------------------------------------------
def test_quantize_below_min_cosine_exits_1_and_leaves_the_directory_unchanged(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("clip"))
    before = snapshot(model_dir)

    result = vlmopt("quantize", model_dir, "--mode", "int4", "--block-size", "16", "--min-cosine", "0.999999")

    assert result.exit_code == 1, result.output
    assert "below --min-cosine" in result.stderr
    assert "nothing was written" in result.stderr
    assert "Traceback" not in result.output
    assert snapshot(model_dir) == before
    assert leftovers(model_dir) == []


def test_int4_at_the_default_min_cosine_fails_on_the_random_weight_text_tower(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("clip"))
    before = snapshot(model_dir)

    result = vlmopt("quantize", model_dir, "--mode", "int4")

    assert result.exit_code == 1, result.output
    assert "text tower" in result.stderr and f"below --min-cosine {MIN_COSINE:g}" in result.stderr
    assert snapshot(model_dir) == before


def test_failed_quantize_with_json_prints_the_failed_verification(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("clip"))

    result = vlmopt("quantize", model_dir, "--mode", "int8-dynamic", "--min-cosine", "0.999999", "--json")

    report = json.loads(result.stdout)
    assert result.exit_code == 1
    assert (report["ok"], report["exit_code"]) == (False, 1)
    assert report["verification"]["passed"] is False
    assert report["verification"]["gates"]["min_cosine"] == 0.999999


def test_forced_quantize_failing_verification_keeps_the_previous_variant(
    variants: tuple[Path, dict[str, Result]], copy_model_dir: Callable[[Path], Path]
) -> None:
    model_dir = copy_model_dir(variants[0])
    before = snapshot(model_dir)

    result = vlmopt("quantize", model_dir, "--mode", "int8-dynamic", "--force", "--min-cosine", "0.999999")

    assert result.exit_code == 1, result.output
    assert snapshot(model_dir) == before
    assert leftovers(model_dir) == []


def test_zero_shot_agreement_below_min_agreement_exits_1_and_writes_nothing(converted: Callable[[str], Path], tmp_path: Path) -> None:
    """Static int8 moves the best caption of one of the ten built-in photos on the tiny random CLIP, whose captions'
    scores lie close together; which form moves one depends on the CPU's int8 kernels (ONNX Runtime's form: 0.9 with
    AVX-512 VNNI, 1.0 on AVX2; the TensorRT form: 0.9 on AVX2, 1.0 with VNNI). Both run, each on its own copy: at least
    one misses the gate, and each that misses it refuses in one line and writes nothing."""
    refused = 0
    for index, target in enumerate(([], ["--target", "tensorrt"])):
        model_dir = tmp_path / f"clip-{index}"
        shutil.copytree(converted("clip"), model_dir)
        before = snapshot(model_dir)

        result = vlmopt("quantize", model_dir, "--mode", "int8-static", *target, "--min-cosine", "0", "--min-agreement", "1")

        assert result.exit_code in (0, 1), result.output
        if result.exit_code == 1:
            refused += 1
            assert "below --min-agreement 1" in result.stderr
            assert snapshot(model_dir) == before
            assert leftovers(model_dir) == []
    assert refused >= 1


def test_min_cosine_off_turns_the_cosine_gate_off(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("clip"))

    artifact = vlmopt_json("quantize", model_dir, "--mode", "int4", "--min-cosine", "off")["artifact"]

    assert artifact["verification"]["passed"] is True
    assert artifact["verification"]["gates"]["min_cosine"] is None


# -- reruns --------------------------------------------------------------------------------------
def test_rerunning_the_same_quantize_is_skipped(variants: tuple[Path, dict[str, Result]], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(variants[0])
    before = snapshot(model_dir)

    report = vlmopt_json("quantize", model_dir, "--mode", "int8-dynamic")

    assert report["skipped"] is True
    assert snapshot(model_dir) == before


def test_quantize_with_other_options_is_redone(variants: tuple[Path, dict[str, Result]], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(variants[0])

    report = vlmopt_json("quantize", model_dir, "--mode", "int8-dynamic", "--per-tensor")

    assert report["skipped"] is False
    assert report["artifact"]["options"]["per_channel"] is False


@pytest.fixture
def calibrated_here(tmp_path: Path, converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> tuple[Path, Path, Path, tuple[str, str]]:
    """(model directory, images, prompts, calibration digests) of an int8-static made from this test's own calibration files."""
    images, prompts = _write_images(tmp_path / "images"), _write_prompts(tmp_path / "prompts.txt")
    model_dir = copy_model_dir(converted("clip"))
    artifact = vlmopt_json("quantize", model_dir, "--mode", "int8-static", "--calib-images", images, "--calib-text", prompts, "--min-cosine", "0.9")["artifact"]
    return model_dir, images, prompts, _digests(artifact)


def _digests(artifact: dict[str, Any]) -> tuple[str, str]:
    return artifact["options"]["calib_images_digest"], artifact["options"]["calib_text_digest"]


def test_rerun_with_unchanged_calibration_files_is_skipped(calibrated_here: tuple[Path, Path, Path, tuple[str, str]]) -> None:
    model_dir, images, prompts, _ = calibrated_here

    report = vlmopt_json("quantize", model_dir, "--mode", "int8-static", "--calib-images", images, "--calib-text", prompts, "--min-cosine", "0.9")

    assert report["skipped"] is True


@pytest.mark.parametrize("change", ["image", "prompts"])
def test_rerun_after_the_calibration_data_changed_is_redone(change: str, calibrated_here: tuple[Path, Path, Path, tuple[str, str]]) -> None:
    model_dir, images, prompts, digest = calibrated_here
    if change == "image":
        _write_images(images, seed=1)
    else:
        _write_prompts(prompts, [*PROMPTS[:-1], "a blue truck in the city"])

    report = vlmopt_json("quantize", model_dir, "--mode", "int8-static", "--calib-images", images, "--calib-text", prompts, "--min-cosine", "0.9")

    assert report["skipped"] is False
    changed = [old != new for old, new in zip(digest, _digests(report["artifact"]), strict=True)]
    assert changed == ([True, False] if change == "image" else [False, True])


# -- choosing what is quantized ----------------------------------------------------------------------
FC1 = "/text_model/encoder/layers.0/mlp/fc1/MatMul"


def test_int8_dynamic_exclude_nodes_leaves_that_matmul_float(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("clip"))

    vlmopt_json("quantize", model_dir, "--mode", "int8-dynamic", "--exclude-nodes", FC1)

    model = _graph(model_dir, "int8-dynamic", "text")
    assert FC1 in _weight_matmuls(model)
    assert _count(model)["MatMulInteger"] == len(_weight_matmuls(onnx.load(converted("clip") / "onnx" / "text.onnx"))) - 1


def test_int8_dynamic_nodes_quantizes_only_the_named_matmul(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("clip"))

    vlmopt_json("quantize", model_dir, "--mode", "int8-dynamic", "--nodes", FC1)

    quantized = {t: _count(_graph(model_dir, "int8-dynamic", t))["MatMulInteger"] for t in CLIP_TOWERS}
    assert quantized == {"text": 1, "vision": 0}
    assert FC1 not in _weight_matmuls(_graph(model_dir, "int8-dynamic", "text"))


def test_int8_dynamic_exclude_op_types_matmul_leaves_every_matmul_float(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("clip"))

    artifact = vlmopt_json("quantize", model_dir, "--mode", "int8-dynamic", "--exclude-op-types", "MatMul")["artifact"]

    for tower in CLIP_TOWERS:
        assert not set(QUANTIZED_OPS) & set(artifact["record"]["towers"][tower]["op_counts"]), tower


def test_int4_exclude_nodes_leaves_that_matmul_float(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("clip"))

    vlmopt_json("quantize", model_dir, "--mode", "int4", "--op-types", "MatMul", "--exclude-nodes", FC1, "--min-cosine", "0.9")

    model = _graph(model_dir, "int4", "text")
    assert _weight_matmuls(model) == [FC1]
    assert _count(model)["MatMulNBits"] == len(_weight_matmuls(onnx.load(converted("clip") / "onnx" / "text.onnx"))) - 1


def test_int4_nodes_quantizes_only_the_named_matmul(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("clip"))

    vlmopt_json("quantize", model_dir, "--mode", "int4", "--nodes", FC1, "--min-cosine", "0.9")

    quantized = {t: _count(_graph(model_dir, "int4", t))["MatMulNBits"] for t in CLIP_TOWERS}
    assert quantized == {"text": 1, "vision": 0}


@pytest.mark.parametrize(
    "flags",
    [("--mode", "int4", "--exclude-op-types", "MatMul"), ("--mode", "int8-dynamic", "--exclude-op-types", "MatMul,Attention")],
    ids=["int4", "int8-dynamic"],
)
def test_excluding_every_op_type_a_mode_quantizes_never_quantizes_them(
    flags: tuple[str, ...], converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]
) -> None:
    model_dir = copy_model_dir(converted("clip"))

    result = vlmopt("quantize", model_dir, *flags, "--min-cosine", "0", "--name", "excluded", "--json")

    if result.exit_code == 2:  # refusing the contradiction is as good as honouring it
        assert_bad_input(result, "--exclude-op-types")
        return
    assert result.exit_code == 0, result.output
    for tower, recorded in json.loads(result.stdout)["artifact"]["record"]["towers"].items():
        assert not set(QUANTIZED_OPS) & set(recorded["op_counts"]), tower


# -- from the optimized artifact -------------------------------------------------------------------
@pytest.fixture(scope="module")
def optimized(tmp_path_factory: pytest.TempPathFactory, converted: Callable[[str], Path]) -> Path:
    """The tiny CLIP with `onnx-opt`."""
    model_dir = tmp_path_factory.mktemp("quantize-optimized") / "clip"
    shutil.copytree(converted("clip"), model_dir)
    vlmopt_json("optimize", model_dir)
    return model_dir


def test_int4_of_the_optimized_artifact_records_it_as_parent(optimized: Path, copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(optimized)

    artifact = vlmopt_json("quantize", model_dir, "--mode", "int4", "--from", "onnx-opt", "--name", "int4-opt", "--min-cosine", "0.9")["artifact"]

    assert artifact["parent"] == "onnx-opt"
    assert artifact["verification"]["reference"] == "onnx-opt"
    assert artifact["record"]["towers"]["text"]["op_counts"]["Attention"] == 2


def test_int8_dynamic_of_the_optimized_artifact_keeps_biased_attention_in_fp32(optimized: Path, copy_model_dir: Callable[[Path], Path]) -> None:
    """ORT's QAttention drops the attention bias (CLIP text's causal mask): those Attention nodes stay fp32."""
    model_dir = copy_model_dir(optimized)

    artifact = vlmopt_json("quantize", model_dir, "--mode", "int8-dynamic", "--from", "onnx-opt", "--name", "int8-opt")["artifact"]

    assert artifact["record"]["towers"]["text"]["op_counts"]["Attention"] == 2
    assert artifact["record"]["towers"]["vision"]["op_counts"]["QAttention"] == 2


def test_fp16_of_the_optimized_artifact_is_refused(optimized: Path, copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(optimized)
    before = snapshot(model_dir)

    assert_bad_input(vlmopt("quantize", model_dir, "--mode", "fp16", "--from", "onnx-opt"), "fp16 reads an unfused export")
    assert snapshot(model_dir) == before


@pytest.mark.parametrize("mode", ["int8-dynamic", "int8-static"])
def test_quantize_reads_the_optimized_artifact(mode: str, optimized: Path, copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(optimized)

    result = vlmopt("quantize", model_dir, "--mode", mode, "--from", "onnx-opt", "--name", f"{mode}-opt", "--json")

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["artifact"]["parent"] == "onnx-opt"


# -- bench ---------------------------------------------------------------------------------------------
def test_bench_runs_every_variant(variants: tuple[Path, dict[str, Result]], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(variants[0])

    report = vlmopt_json("bench", model_dir, *QUICK_BENCH)

    measured = sorted({(r["artifact"], r["tower"]) for r in report["rows"]})
    assert measured == sorted((a, t) for a in ("hf", "onnx", *VARIANTS) for t in CLIP_TOWERS)
    assert report["not_measured"] == []


def test_bench_compares_the_int8_variant_with_pytorch(variants: tuple[Path, dict[str, Result]], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(variants[0])

    report = vlmopt_json("bench", model_dir, "onnx", "int8-dynamic", *QUICK_BENCH)

    rows = {(r["artifact"], r["tower"]): r for r in report["rows"]}
    assert sorted(rows) == sorted((a, t) for a in ("hf", "onnx", "int8-dynamic") for t in CLIP_TOWERS)
    for tower in CLIP_TOWERS:
        assert 0.99 < rows["int8-dynamic", tower]["cosine_min"] <= rows["onnx", tower]["cosine_min"] + 1e-6
