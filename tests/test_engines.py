"""The TensorRT logic that needs no TensorRT: optimization profiles, shape overrides, engine metadata and the
checks that gate loading an engine, version gating, `vlmopt build`'s options and parent checks, parse-error
messages, and which stages a machine can run."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import manifest, vlmopt_json
from vlmopt.engines import (
    Profile,
    check_engine_compatible,
    check_tensorrt_version,
    derive_profiles,
    engine_metadata,
    parse_shape_override,
    parse_version,
)
from vlmopt.errors import VlmoptError
from vlmopt.families import Tower
from vlmopt.machine import INSTALL_TENSORRT, Gpu, Machine, OpenVINOInfo, stages_usable
from vlmopt.stages.build import STAGE as BUILD
from vlmopt.stages.build import BuildOptions, parse_error_message, sparse_requested
from vlmopt.workspace import Artifact, ModelDir

EXAMPLE_DATA = Path(__file__).resolve().parents[1] / "examples" / "data"


# -- the tiny CLIP's towers, as its manifest records them --------------------------------------------
@pytest.fixture(scope="module")
def towers(converted: Callable[[str], Path]) -> dict[str, Tower]:
    recorded = manifest(converted("clip"))["artifacts"]["onnx"]["towers"]
    return {name: Tower.from_json(name, data) for name, data in recorded.items()}


@pytest.fixture(scope="module")
def vision(towers: dict[str, Tower]) -> Tower:
    return towers["vision"]


@pytest.fixture(scope="module")
def text(towers: dict[str, Tower]) -> Tower:
    return towers["text"]


def _image_size(vision: Tower) -> tuple[int, int, int]:
    """(channels, height, width) of the vision tower's fixed pixel_values dimensions."""
    (spec,) = vision.inputs
    assert spec.name == "pixel_values"
    channels, height, width = spec.shape[1:]
    assert all(isinstance(d, int) for d in (channels, height, width)), spec.shape
    return channels, height, width


def _longest(text: Tower) -> int:
    assert text.vocab is not None
    return text.vocab.max_length


# -- derive_profiles ----------------------------------------------------------------------------------
def test_vision_profile_spans_batch_one_to_max_batch_at_the_fixed_image_size(vision: Tower) -> None:
    c, h, w = _image_size(vision)

    profiles = derive_profiles(vision, opt_batch=8, max_batch=32, max_seq=None)

    assert profiles == {"pixel_values": Profile(min=(1, c, h, w), opt=(8, c, h, w), max=(32, c, h, w))}


def test_text_profiles_run_to_the_model_s_longest_sequence_by_default(text: Tower) -> None:
    longest = _longest(text)

    profiles = derive_profiles(text, opt_batch=8, max_batch=32, max_seq=None)

    expected = Profile(min=(1, 1), opt=(8, longest), max=(32, longest))
    assert profiles == {"input_ids": expected, "attention_mask": expected}


def test_text_profiles_stop_at_max_seq_when_given(text: Tower) -> None:
    profiles = derive_profiles(text, opt_batch=4, max_batch=16, max_seq=16)

    expected = Profile(min=(1, 1), opt=(4, 16), max=(16, 16))
    assert profiles == {"input_ids": expected, "attention_mask": expected}


def test_max_seq_equal_to_the_model_s_longest_sequence_is_accepted(text: Tower) -> None:
    longest = _longest(text)

    profiles = derive_profiles(text, opt_batch=8, max_batch=32, max_seq=longest)

    assert profiles["input_ids"].max == (32, longest)


def test_max_seq_longer_than_the_model_is_refused(text: Tower) -> None:
    longest = _longest(text)

    with pytest.raises(VlmoptError, match=rf"--max-seq {longest + 1} is longer than the text tower's {longest} positions"):
        derive_profiles(text, opt_batch=8, max_batch=32, max_seq=longest + 1)


def test_max_seq_is_ignored_by_a_tower_without_text(vision: Tower) -> None:
    assert derive_profiles(vision, 8, 32, max_seq=10_000) == derive_profiles(vision, 8, 32, max_seq=None)


def test_opt_batch_equal_to_max_batch_is_accepted(vision: Tower) -> None:
    profile = derive_profiles(vision, opt_batch=4, max_batch=4, max_seq=None)["pixel_values"]

    assert (profile.min[0], profile.opt[0], profile.max[0]) == (1, 4, 4)


@pytest.mark.parametrize(("opt_batch", "max_batch"), [(16, 8), (0, 8)], ids=["opt-above-max", "opt-zero"])
def test_opt_batch_outside_one_to_max_batch_is_refused(opt_batch: int, max_batch: int, vision: Tower) -> None:
    with pytest.raises(VlmoptError, match=rf"--opt-batch \({opt_batch}\)"):
        derive_profiles(vision, opt_batch=opt_batch, max_batch=max_batch, max_seq=None)


def test_an_override_replaces_that_input_s_profile_only(text: Tower) -> None:
    longest = _longest(text)
    override = Profile(min=(1, 8), opt=(4, 16), max=(16, 16))

    profiles = derive_profiles(text, 8, 32, None, overrides={"input_ids": override})

    assert profiles["input_ids"] == override
    assert profiles["attention_mask"] == Profile(min=(1, 1), opt=(8, longest), max=(32, longest))


def test_an_override_may_change_the_batch_of_an_input_with_fixed_dimensions(vision: Tower) -> None:
    c, h, w = _image_size(vision)
    override = Profile(min=(2, c, h, w), opt=(2, c, h, w), max=(4, c, h, w))

    profiles = derive_profiles(vision, 8, 32, None, overrides={"pixel_values": override})

    assert profiles == {"pixel_values": override}


def test_the_overrides_given_are_left_as_they_were(text: Tower) -> None:
    overrides = {"input_ids": Profile(min=(1, 1), opt=(2, 2), max=(4, 4))}

    derive_profiles(text, 8, 32, None, overrides=overrides)

    assert list(overrides) == ["input_ids"]


def test_an_override_of_another_rank_is_refused(text: Tower) -> None:
    with pytest.raises(VlmoptError, match="--shapes input_ids: the input has rank 2, the override 3"):
        derive_profiles(text, 8, 32, None, overrides={"input_ids": Profile(min=(1, 1, 1), opt=(1, 1, 1), max=(1, 1, 1))})


def test_an_override_that_changes_a_dimension_fixed_in_the_graph_is_refused(vision: Tower) -> None:
    c, h, w = _image_size(vision)
    bigger = Profile(min=(1, c, h, w), opt=(1, c, h, w), max=(1, c, 2 * h, 2 * w))

    with pytest.raises(VlmoptError, match="--shapes pixel_values: dimensions fixed in the graph"):
        derive_profiles(vision, 8, 32, None, overrides={"pixel_values": bigger})


def test_an_override_naming_no_input_of_the_tower_is_refused(text: Tower) -> None:
    stray = Profile(min=(1, 1), opt=(1, 1), max=(1, 1))

    with pytest.raises(VlmoptError, match="--shapes names token_type_ids, but the text tower's inputs are input_ids, attention_mask"):
        derive_profiles(text, 8, 32, None, overrides={"token_type_ids": stray})


# -- parse_shape_override -----------------------------------------------------------------------------
def test_a_shape_override_reads_name_min_opt_max() -> None:
    assert parse_shape_override("input_ids:1x77,8x77,32x77") == ("input_ids", Profile(min=(1, 77), opt=(8, 77), max=(32, 77)))


def test_a_shape_override_of_rank_one_reads_plain_numbers() -> None:
    assert parse_shape_override("lengths:1,4,8") == ("lengths", Profile(min=(1,), opt=(4,), max=(8,)))


def test_a_shape_override_name_may_contain_colons() -> None:
    name, profile = parse_shape_override("text:input_ids:1x77,8x77,32x77")

    assert name == "text:input_ids"
    assert profile == Profile(min=(1, 77), opt=(8, 77), max=(32, 77))


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("1x77,8x77,32x77", "name:MIN,OPT,MAX"),
        (":1x77,8x77,32x77", "name:MIN,OPT,MAX"),
        ("input_ids:1x77,32x77", "name:MIN,OPT,MAX"),
        ("input_ids:1x77,8x77,32x77,64x77", "name:MIN,OPT,MAX"),
        ("input_ids:1xN,8x77,32x77", "name:MIN,OPT,MAX"),
        ("input_ids:1x77,8x77,", "name:MIN,OPT,MAX"),
        ("input_ids:-1x77,8x77,32x77", "name:MIN,OPT,MAX"),
        ("input_ids:8x77,1x77,32x77", "min <= opt <= max"),
        ("input_ids:1x77,8x77,4x77", "min <= opt <= max"),
        ("input_ids:0x77,8x77,32x77", "at least 1"),
        ("input_ids:1x0,1x0,1x0", "at least 1"),
        ("input_ids:1x77,8x77,32", "same rank"),
    ],
    ids=[
        "missing-name-and-colon",
        "empty-name",
        "two-shapes",
        "four-shapes",
        "non-numeric",
        "empty-shape",
        "negative",
        "min-above-opt",
        "opt-above-max",
        "zero-batch",
        "zero-sequence",
        "rank-mismatch",
    ],
)
def test_a_malformed_shape_override_is_refused(text: str, fragment: str) -> None:
    with pytest.raises(VlmoptError, match="--shapes") as raised:
        parse_shape_override(text)

    assert fragment in raised.value.message


# -- Profile ------------------------------------------------------------------------------------------
PROFILE = Profile(min=(1, 1), opt=(8, 32), max=(32, 32))


@pytest.mark.parametrize("shape", [(1, 1), (8, 32), (32, 32), (5, 17)], ids=["min", "opt", "max", "between"])
def test_a_profile_admits_shapes_inside_its_range(shape: tuple[int, ...]) -> None:
    assert PROFILE.admits(shape)


@pytest.mark.parametrize("shape", [(33, 32), (8, 33), (0, 8), (8,), (8, 32, 1)], ids=["batch-above", "sequence-above", "batch-zero", "rank-1", "rank-3"])
def test_a_profile_refuses_shapes_outside_its_range_or_of_another_rank(shape: tuple[int, ...]) -> None:
    assert not PROFILE.admits(shape)


def test_a_profile_survives_a_json_round_trip() -> None:
    assert PROFILE.to_json() == {"min": [1, 1], "opt": [8, 32], "max": [32, 32]}
    assert Profile.from_json(PROFILE.to_json()) == PROFILE


# -- engine metadata and the load-time check ----------------------------------------------------------
BUILT = ("10.14.1", "NVIDIA A100-SXM4-80GB", (8, 0))
REBUILD = "vlmopt build build/clip --from onnx --name trt-onnx --force"


def _meta(**extra: object) -> dict[str, object]:
    version, gpu, cc = BUILT
    return engine_metadata(version, gpu, cc, {"input_ids": PROFILE}, source="onnx", **extra)


def test_engine_metadata_records_tensorrt_gpu_compute_capability_profiles_and_source() -> None:
    meta = engine_metadata("10.14.1", "NVIDIA L4", (8, 9), {"input_ids": PROFILE}, source="fp16", hardware_compatibility="none", version_compatible=False)

    assert meta == {
        "tensorrt_version": "10.14.1",
        "gpu": "NVIDIA L4",
        "compute_capability": "8.9",
        "profiles": {"input_ids": {"min": [1, 1], "opt": [8, 32], "max": [32, 32]}},
        "source": "fp16",
        "hardware_compatibility": "none",
        "version_compatible": False,
    }


def test_engine_metadata_profiles_read_back_as_the_profiles_recorded() -> None:
    profiles = {"input_ids": PROFILE, "attention_mask": Profile(min=(1, 1), opt=(2, 2), max=(3, 3))}

    meta = engine_metadata("10.14.1", "NVIDIA L4", (8, 9), profiles)

    assert {name: Profile.from_json(p) for name, p in meta["profiles"].items()} == profiles


def test_an_engine_loads_with_the_same_tensorrt_on_the_same_compute_capability() -> None:
    check_engine_compatible(_meta(), "10.14.1", "NVIDIA A100-SXM4-80GB", (8, 0), REBUILD)


def test_an_engine_loads_on_another_gpu_of_the_same_compute_capability() -> None:
    check_engine_compatible(_meta(), "10.14.1", "NVIDIA A30", (8, 0), REBUILD)


def test_an_engine_from_another_patch_release_is_refused_saying_what_it_was_built_for_and_how_to_rebuild() -> None:
    with pytest.raises(VlmoptError) as raised:
        check_engine_compatible(_meta(), "10.14.2", "NVIDIA A100-SXM4-80GB", (8, 0), REBUILD)

    message = raised.value.message
    assert "built with TensorRT 10.14.1 on NVIDIA A100-SXM4-80GB (compute capability 8.0)" in message
    assert "this machine has TensorRT 10.14.2" in message
    assert message.endswith(f"Rebuild it here: {REBUILD}")


@pytest.mark.parametrize("here", ["10.14.2", "10.15.0", "10.14.1.48"], ids=["later-patch", "later-minor", "same-with-build-number"])
def test_a_version_compatible_engine_loads_on_a_later_release_of_the_same_major(here: str) -> None:
    check_engine_compatible(_meta(version_compatible=True), here, "NVIDIA A100-SXM4-80GB", (8, 0), REBUILD)


@pytest.mark.parametrize("here", ["10.13.0", "10.14.0", "11.0.0", "9.3.0"], ids=["earlier-minor", "earlier-patch", "next-major", "earlier-major"])
def test_a_version_compatible_engine_is_refused_by_an_earlier_release_or_another_major(here: str) -> None:
    with pytest.raises(VlmoptError, match=rf"built with TensorRT 10\.14\.1 .*this machine has TensorRT {here}\. Rebuild it here: "):
        check_engine_compatible(_meta(version_compatible=True), here, "NVIDIA A100-SXM4-80GB", (8, 0), REBUILD)


def test_an_engine_built_for_another_compute_capability_is_refused_naming_both_gpus() -> None:
    with pytest.raises(VlmoptError) as raised:
        check_engine_compatible(_meta(), "10.14.1", "NVIDIA A10G", (8, 6), REBUILD)

    message = raised.value.message
    assert "built with TensorRT 10.14.1 on NVIDIA A100-SXM4-80GB (compute capability 8.0)" in message
    assert "this GPU is NVIDIA A10G (compute capability 8.6)" in message
    assert message.endswith(f"Rebuild it here: {REBUILD}")


def test_a_same_cc_engine_is_refused_on_another_compute_capability() -> None:
    with pytest.raises(VlmoptError, match="compute capability 9.0"):
        check_engine_compatible(_meta(hardware_compatibility="same-cc"), "10.14.1", "NVIDIA H100", (9, 0), REBUILD)


@pytest.mark.parametrize(("gpu", "cc"), [("NVIDIA A10G", (8, 6)), ("NVIDIA H100 80GB HBM3", (9, 0))], ids=["8.6", "9.0"])
def test_an_ampere_plus_engine_loads_on_any_gpu_of_compute_capability_8_or_later(gpu: str, cc: tuple[int, int]) -> None:
    check_engine_compatible(_meta(hardware_compatibility="ampere+"), "10.14.1", gpu, cc, REBUILD)


def test_an_ampere_plus_engine_is_refused_below_compute_capability_8() -> None:
    with pytest.raises(VlmoptError, match=r"this GPU is Tesla T4 \(compute capability 7\.5\)"):
        check_engine_compatible(_meta(hardware_compatibility="ampere+"), "10.14.1", "Tesla T4", (7, 5), REBUILD)


def test_an_ampere_plus_engine_still_needs_the_tensorrt_it_was_built_with() -> None:
    with pytest.raises(VlmoptError, match="this machine has TensorRT 10.15.0"):
        check_engine_compatible(_meta(hardware_compatibility="ampere+"), "10.15.0", "NVIDIA H100", (9, 0), REBUILD)


# -- TensorRT versions --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "parsed"),
    [("10.14.1", (10, 14, 1)), ("10.14.1.48", (10, 14, 1)), ("10.0.0b6", (10, 0, 0)), ("11.3", (11, 3))],
    ids=["plain", "build-number", "beta", "two-parts"],
)
def test_parse_version_keeps_the_first_three_numbers(text: str, parsed: tuple[int, ...]) -> None:
    assert parse_version(text) == parsed


@pytest.mark.parametrize("version", ["8.6.1", "9.0.0", "9.3.0.1"])
def test_tensorrt_before_10_is_refused_naming_10_0(version: str) -> None:
    with pytest.raises(VlmoptError) as raised:
        check_tensorrt_version(version)

    assert f"TensorRT {version} is too old" in raised.value.message
    assert ">= 10.0" in raised.value.message
    assert INSTALL_TENSORRT in raised.value.message


@pytest.mark.parametrize("version", ["10.0.0", "10.14.1", "10.14.1.48", "11.3.0"])
def test_tensorrt_10_and_later_are_accepted(version: str) -> None:
    check_tensorrt_version(version)


# -- BuildOptions -------------------------------------------------------------------------------------
def test_default_build_options_are_valid() -> None:
    BuildOptions().validate()


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"optimization_level": 6}, "--optimization-level must be in [0, 5], got 6"),
        ({"optimization_level": -1}, "--optimization-level must be in [0, 5], got -1"),
        ({"workspace": 0}, "--workspace must be at least 1, got 0"),
        ({"hardware_compatibility": "turing"}, "--hardware-compatibility must be one of none, ampere+, same-cc, got 'turing'"),
        ({"sparse_weights": "maybe"}, "--sparse-weights must be one of auto, on, off, got 'maybe'"),
        ({"min_cosine": 2.0}, "--min-cosine must be in [0, 1], got 2.0"),
        ({"min_cosine": -0.5}, "--min-cosine must be in [0, 1], got -0.5"),
        ({"opt_batch": 64, "max_batch": 32}, "--opt-batch (64) must be at least 1 and at most --max-batch (32)"),
        ({"opt_batch": 0}, "--opt-batch must be at least 1, got 0"),
        ({"max_seq": 0}, "--max-seq must be at least 1, got 0"),
        ({"shapes": ["bad"]}, "--shapes takes name:MIN,OPT,MAX"),
        ({"shapes": ["input_ids:1x77,8x77,32x77", "attention_mask:8x77,1x77,32x77"]}, "--shapes attention_mask:8x77,1x77,32x77"),
    ],
    ids=[
        "optimization-level-6",
        "optimization-level-negative",
        "workspace-0",
        "hardware-compatibility-turing",
        "sparse-maybe",
        "min-cosine-2",
        "min-cosine-negative",
        "opt-batch-above-max-batch",
        "opt-batch-0",
        "max-seq-0",
        "shapes-bad",
        "second-shapes-bad",
    ],
)
def test_invalid_build_options_are_refused(options: dict[str, object], fragment: str) -> None:
    with pytest.raises(VlmoptError) as raised:
        BuildOptions(**options).validate()

    assert fragment in raised.value.message


@pytest.mark.parametrize("level", ["none", "ampere+", "same-cc"])
def test_every_hardware_compatibility_level_is_accepted(level: str) -> None:
    BuildOptions(hardware_compatibility=level).validate()


def test_min_cosine_none_turns_the_check_off_and_is_valid() -> None:
    BuildOptions(min_cosine=None).validate()


@pytest.mark.parametrize(("source", "output", "name"), [("onnx", None, "trt-onnx"), ("fp16", None, "trt-fp16"), ("fp16", "engines", "engines")])
def test_the_engine_artifact_is_named_trt_source_unless_named(source: str, output: str | None, name: str) -> None:
    assert BuildOptions(source=source, name=output).artifact == name


def test_build_options_overrides_are_the_parsed_shapes_by_input_name() -> None:
    options = BuildOptions(shapes=["input_ids:1x8,4x16,8x16", "attention_mask:1x8,4x16,8x16"])

    expected = Profile(min=(1, 8), opt=(4, 16), max=(8, 16))
    assert options.overrides() == {"input_ids": expected, "attention_mask": expected}


def test_the_rebuild_command_names_the_directory_source_and_name_with_force(tmp_path: Path) -> None:
    command = BUILD.command_line(tmp_path / "clip", BuildOptions(source="fp16"))

    assert command == f"vlmopt build {tmp_path / 'clip'} --from fp16 --name trt-fp16 --force"


# -- check_parent and sparse_requested, on artifacts `vlmopt` made --------------------------------------
@pytest.fixture(scope="module")
def clip_variants(tmp_path_factory: pytest.TempPathFactory, converted: Callable[[str], Path]) -> ModelDir:
    """The tiny CLIP with fp16, int8-static-trt, CPU int8-static, onnx-opt and a 2:4 pruned and converted onnx-24."""
    model_dir = tmp_path_factory.mktemp("build-parents") / "clip"
    shutil.copytree(converted("clip"), model_dir)
    vlmopt_json("quantize", model_dir, "--mode", "fp16")
    # calibrated on real photos and captions: synthetic ranges miss the gate on the built-in photos (0.986)
    calibration = ("--calib-images", EXAMPLE_DATA / "images", "--calib-text", EXAMPLE_DATA / "prompts.txt")
    vlmopt_json("quantize", model_dir, "--mode", "int8-static", "--target", "tensorrt", *calibration)
    vlmopt_json("quantize", model_dir, "--mode", "int8-static", *calibration)
    vlmopt_json("optimize", model_dir)
    vlmopt_json("prune", model_dir, "--pattern", "2:4", "--name", "hf-24")
    vlmopt_json("convert", model_dir, "--from", "hf-24", "--name", "onnx-24")
    return ModelDir(model_dir)


def _artifact(model_dir: ModelDir, name: str) -> Artifact:
    return model_dir.artifact(name)


@pytest.mark.parametrize("name", ["onnx", "fp16", "int8-static-trt", "onnx-24"])
def test_build_accepts_plain_fp16_tensorrt_int8_and_sparse_onnx_artifacts(name: str, clip_variants: ModelDir) -> None:
    BUILD.check_parent(_artifact(clip_variants, name), BuildOptions())


def test_build_refuses_a_hugging_face_artifact(clip_variants: ModelDir) -> None:
    with pytest.raises(VlmoptError, match="build reads an ONNX artifact; 'hf' is a Hugging Face artifact"):
        BUILD.check_parent(_artifact(clip_variants, "hf"), BuildOptions())


def test_build_refuses_an_artifact_with_onnx_runtime_only_operators(clip_variants: ModelDir) -> None:
    with pytest.raises(VlmoptError) as raised:
        BUILD.check_parent(_artifact(clip_variants, "onnx-opt"), BuildOptions())

    message = raised.value.message
    assert "'onnx-opt' holds ONNX Runtime-only operators (com.microsoft)" in message
    assert "build from onnx, fp16 or int8-static-trt" in message


def test_build_refuses_a_cpu_int8_artifact_with_its_recorded_issue(clip_variants: ModelDir) -> None:
    parent = _artifact(clip_variants, "int8-static")
    tower, issue = next(iter(parent.traits.tensorrt_issues.items()))
    assert issue is not None

    with pytest.raises(VlmoptError) as raised:
        BUILD.check_parent(parent, BuildOptions())

    message = raised.value.message
    assert f"'int8-static' is not a graph TensorRT builds ({tower}: {issue})" in message
    assert "--target tensorrt" in message


def test_sparse_weights_auto_is_on_for_an_artifact_pruned_to_2_4(clip_variants: ModelDir) -> None:
    parent = _artifact(clip_variants, "onnx-24")
    assert parent.traits.two_four_sparse is True

    assert sparse_requested("auto", parent) is True


def test_sparse_weights_auto_is_off_for_an_unpruned_artifact(clip_variants: ModelDir) -> None:
    assert sparse_requested("auto", _artifact(clip_variants, "onnx")) is False


def test_sparse_weights_on_forces_sparsity_for_any_artifact(clip_variants: ModelDir) -> None:
    assert sparse_requested("on", _artifact(clip_variants, "onnx")) is True


def test_sparse_weights_off_turns_sparsity_off_even_for_a_2_4_artifact(clip_variants: ModelDir) -> None:
    assert sparse_requested("off", _artifact(clip_variants, "onnx-24")) is False


# -- parse_error_message ------------------------------------------------------------------------------
def test_a_parse_error_names_the_tower_node_operator_and_description() -> None:
    message = parse_error_message("vision", [("Assertion failed: axis in range\nmore detail", "/encoder/Gather_3", "Gather")])

    assert message == "TensorRT cannot parse the vision tower at node '/encoder/Gather_3' (Gather): Assertion failed: axis in range"


def test_a_parse_error_counts_the_errors_after_the_first() -> None:
    errors = [("first problem", "a", "Add"), ("second problem", "b", "Mul"), ("third problem", "c", "Sub")]

    message = parse_error_message("text", errors)

    assert "first problem (+2 more)" in message
    assert "second problem" not in message


def test_a_single_parse_error_says_no_more() -> None:
    assert "more)" not in parse_error_message("text", [("only problem", "a", "Add")])


def test_a_parse_error_for_an_unimplemented_operator_suggests_the_plain_export() -> None:
    message = parse_error_message("text", [("No importer registered for op: SkipLayerNormalization", "/l0/skip", "SkipLayerNormalization")])

    assert "; hint: an operator TensorRT does not implement" in message
    assert "--from onnx" in message


def test_a_parse_error_about_int64_suggests_re_exporting() -> None:
    message = parse_error_message("text", [("Your ONNX model has been generated with INT64 weights", "/embeddings/Gather", "Gather")])

    assert "; hint: INT64 tensors" in message
    assert "vlmopt convert --opset 18" in message


def test_a_parse_error_on_a_dequantize_node_suggests_tensorrt_quantization() -> None:
    message = parse_error_message("vision", [("unsupported zero point", "/l0/dq", "DequantizeLinear")])

    assert "; hint: Q/DQ TensorRT rejects: quantize with --mode int8-static --target tensorrt" in message


def test_an_unfamiliar_parse_error_has_no_hint() -> None:
    assert "hint" not in parse_error_message("text", [("something nobody has seen", "n", "Foo")])


def test_a_parse_error_without_node_or_operator_leaves_out_where() -> None:
    assert parse_error_message("text", [("bad model", "", "")]) == "TensorRT cannot parse the text tower: bad model"


def test_no_parse_errors_at_all_still_makes_one_line() -> None:
    assert parse_error_message("vision", []) == "TensorRT could not parse the vision tower (no error reported)"


def test_a_long_parse_error_is_cut_to_200_characters() -> None:
    message = parse_error_message("text", [("x" * 500, "n", "Foo")])

    assert "x" * 200 in message
    assert "x" * 201 not in message


def test_a_parse_error_with_an_empty_description_still_makes_a_message() -> None:
    message = parse_error_message("text", [("", "/l0/add", "Add")])

    assert message.startswith("TensorRT cannot parse the text tower at node '/l0/add' (Add)")


# -- stages_usable ------------------------------------------------------------------------------------
A100 = Gpu(index=0, name="NVIDIA A100-SXM4-80GB", compute_capability=(8, 0), memory_gb=79.1)
GPU_PROVIDERS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def _usable(machine: Machine) -> dict[str, dict[str, str]]:
    return {row["stage"]: row for row in stages_usable(machine)}


def test_with_a_gpu_tensorrt_onnxruntime_gpu_and_openvino_every_stage_is_usable() -> None:
    openvino = OpenVINOInfo("2026.4.1", devices=["CPU"], nncf="3.4.0")
    machine = Machine(torch="2.5.0", torch_cuda="12.4", gpus=[A100], onnxruntime="1.20.0", ort_providers=GPU_PROVIDERS, tensorrt="10.14.1", openvino=openvino)

    rows = _usable(machine)

    assert {stage: row["usable"] for stage, row in rows.items() if row["usable"] != "yes"} == {}
    assert {"build", "bench (TensorRT)", "bench (CUDA, PyTorch)", "bench (CUDA, ONNX Runtime)", "bench (CPU)"} <= set(rows)
    assert rows["build"]["needs"] == "TensorRT and a GPU (present)"


def test_with_a_gpu_but_no_tensorrt_build_says_to_install_the_extra() -> None:
    machine = Machine(torch="2.5.0", torch_cuda="12.4", gpus=[A100], ort_providers=GPU_PROVIDERS, tensorrt=None, tensorrt_problem="not installed")

    rows = _usable(machine)

    for stage in ("build", "bench (TensorRT)"):
        assert rows[stage]["usable"] == "no"
        assert rows[stage]["needs"] == "pip install 'vlmopt[tensorrt]'"
    assert rows["bench (CUDA, PyTorch)"]["usable"] == "yes"


def test_with_tensorrt_but_no_gpu_build_says_a_gpu_is_needed() -> None:
    machine = Machine(torch="2.5.0+cpu", torch_cuda=None, gpus=[], ort_providers=["CPUExecutionProvider"], tensorrt="10.14.1")

    rows = _usable(machine)

    assert rows["build"] == {"stage": "build", "usable": "no", "needs": "a CUDA GPU"}
    assert rows["bench (CUDA, PyTorch)"]["usable"] == "no"


def test_with_neither_gpu_nor_tensorrt_build_names_both() -> None:
    rows = _usable(Machine(torch="2.5.0+cpu", torch_cuda=None, ort_providers=["CPUExecutionProvider"]))

    assert rows["build"]["needs"] == "pip install 'vlmopt[tensorrt]'; a CUDA GPU"
    assert rows["export"]["usable"] == "yes"
    assert rows["bench (CPU)"]["usable"] == "yes"


def test_onnxruntime_cuda_bench_needs_the_cuda_execution_provider() -> None:
    machine = Machine(torch="2.5.0", torch_cuda="12.4", gpus=[A100], ort_providers=["CPUExecutionProvider"], tensorrt="10.14.1")

    row = _usable(machine)["bench (CUDA, ONNX Runtime)"]

    assert row["usable"] == "no"
    assert "onnxruntime-gpu" in row["needs"]


def test_the_cuda_execution_provider_without_a_gpu_is_not_enough_for_onnxruntime_cuda_bench() -> None:
    machine = Machine(torch="2.5.0+cpu", torch_cuda=None, gpus=[], ort_providers=GPU_PROVIDERS)

    assert _usable(machine)["bench (CUDA, ONNX Runtime)"]["usable"] == "no"


def test_machine_json_writes_compute_capability_as_major_dot_minor() -> None:
    machine = Machine(torch="2.5.0", torch_cuda="12.4", gpus=[A100], ort_providers=GPU_PROVIDERS, tensorrt="10.14.1")

    data = machine.to_json()

    assert data["gpus"] == [{"index": 0, "name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0", "memory_gb": 79.1}]
    assert data["onnxruntime_providers"] == GPU_PROVIDERS
    assert data["tensorrt"] == "10.14.1"
