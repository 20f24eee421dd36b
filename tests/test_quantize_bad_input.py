"""Input a user can get wrong in `optimize` and `quantize`: exit 2, one line on stderr saying what was wrong, and nothing written."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_bad_input, assert_refused, vlmopt, vlmopt_json


@pytest.fixture
def clip_dir(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> Path:
    """A private copy of the converted tiny CLIP."""
    return copy_model_dir(converted("clip"))


@pytest.fixture(scope="module")
def clip_with_variants(tmp_path_factory: pytest.TempPathFactory, converted: Callable[[str], Path]) -> Path:
    """The converted tiny CLIP with an `fp16` variant and an optimized `onnx-opt` (to copy, not to change)."""
    model_dir = tmp_path_factory.mktemp("bad-input-variants") / "clip"
    shutil.copytree(converted("clip"), model_dir)
    vlmopt_json("quantize", model_dir, "--mode", "fp16")
    vlmopt_json("optimize", model_dir)
    return model_dir


@pytest.fixture
def variants_dir(clip_with_variants: Path, copy_model_dir: Callable[[Path], Path]) -> Path:
    return copy_model_dir(clip_with_variants)


# -- quantize: flag values --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (("--mode", "bf16"), "bf16"),
        (("--mode", "int3"), "--mode"),
        (("--mode", "int4", "--target", "tensorrt"), "--target tensorrt"),
        (("--mode", "int8-dynamic", "--target", "tensorrt"), "--target tensorrt"),
        (("--target", "gpu"), "--target"),
        (("--mode", "int4", "--block-size", "24"), "--block-size"),
        (("--mode", "int4", "--block-size", "8"), "--block-size"),
        (("--mode", "int4", "--accuracy-level", "5"), "--accuracy-level"),
        (("--min-cosine", "1.5"), "--min-cosine"),
        (("--min-agreement", "1.01"), "--min-agreement"),
        (("--mode", "int8-weights", "--calib-images", "photos"), "--calib-images"),
        (("--mode", "int8-dynamic", "--split-outliers", "0", "--calib-text", "prompts.txt"), "--calib-text"),
        (("--mode", "int8-dynamic", "--calib-method", "entropy"), "--calib-method"),
        (("--mode", "int4", "--split-outliers", "2"), "--split-outliers"),
        (("--split-outliers", "-1"), "--split-outliers"),
        (("--mode", "int4", "--calib-text", "prompts.txt"), "--calib-text"),
        (("--mode", "int8-static", "--calib-method", "kl"), "--calib-method"),
        (("--mode", "int8-static", "--calib-samples", "0"), "--calib-samples"),
        (("--mode", "int8-static", "--calib-method", "percentile", "--percentile", "80"), "--percentile"),
        (("--mode", "fp16", "--per-tensor"), "--per-tensor"),
        (("--mode", "int8-weights", "--reduce-range"), "--reduce-range"),
        (("--mode", "fp16", "--fallback"), "--fallback"),
        (("--no-fallback", "--fallback-budget", "0.3"), "--no-fallback"),
        (("--mode", "fp16", "--fallback-budget", "0.3"), "--fallback-budget"),
        (("--fallback-budget", "1.5"), "--fallback-budget must be in [0, 1]"),
        (("--fallback-budget", "-0.1"), "--fallback-budget must be in [0, 1]"),
        (("--fallback-budget", "25%"), "--fallback-budget"),
        (("--fallback", "--min-cosine", "off"), "--min-cosine"),
        (("--fallback-seconds", "0"), "--fallback-seconds"),
        (("--mode", "fp16", "--op-types", "MatMul"), "--exclude-op-types"),
        (("--op-types", "MatMul", "--exclude-op-types", "MatMul"), "both included and excluded"),
        (("--nodes", "a", "--exclude-nodes", "a"), "both included and excluded"),
        (("--mode", "int8-static", "--target", "tensorrt", "--op-types", "MatMul,Conv"), "Conv"),
        (("--name", "../escape"), "../escape"),
    ],
    ids=[
        "bf16",
        "int3",
        "int4-for-tensorrt",
        "int8-dynamic-for-tensorrt",
        "unknown-target",
        "block-size-24",
        "block-size-8",
        "accuracy-level-5",
        "min-cosine-1.5",
        "min-agreement-1.01",
        "calib-images-for-int8-weights",
        "calib-text-for-int8-dynamic-without-an-outlier-split",
        "calib-method-for-int8-dynamic",
        "split-outliers-for-int4",
        "split-outliers-negative",
        "calib-text-for-int4",
        "unknown-calib-method",
        "calib-samples-0",
        "percentile-80",
        "per-tensor-for-fp16",
        "reduce-range-for-int8-weights",
        "fallback-for-fp16",
        "fallback-budget-with-no-fallback",
        "fallback-budget-for-fp16",
        "fallback-budget-above-1",
        "fallback-budget-below-0",
        "fallback-budget-not-a-number",
        "fallback-without-a-gate",
        "fallback-seconds-0",
        "op-types-for-fp16",
        "op-type-included-and-excluded",
        "node-included-and-excluded",
        "conv-for-tensorrt",
        "name-outside-the-directory",
    ],
)
def test_quantize_with_an_invalid_flag_value_isassert_refused(flags: tuple[str, ...], fragment: str, clip_dir: Path) -> None:
    assert_refused(clip_dir, "quantize", *flags, fragments=(fragment,))


# -- quantize: the artifact it reads ----------------------------------------------------------------
def test_quantizing_an_fp16_artifact_again_isassert_refused(variants_dir: Path) -> None:
    assert_refused(variants_dir, "quantize", "--mode", "int8-dynamic", "--from", "fp16", fragments=("already fp16",))


def test_quantizing_the_optimized_artifact_for_tensorrt_isassert_refused(variants_dir: Path) -> None:
    assert_refused(variants_dir, "quantize", "--mode", "int8-static", "--target", "tensorrt", "--from", "onnx-opt", fragments=("onnx-opt", "TensorRT"))


def test_quantizing_the_hugging_face_artifact_isassert_refused(clip_dir: Path) -> None:
    assert_refused(clip_dir, "quantize", "--from", "hf", fragments=("vlmopt convert",))


def test_quantizing_an_artifact_that_does_not_exist_isassert_refused(clip_dir: Path) -> None:
    assert_refused(clip_dir, "quantize", "--from", "onnx-fast", fragments=("onnx-fast",))


def test_quantize_refuses_to_write_over_an_artifact_of_another_stage(clip_dir: Path) -> None:
    assert_refused(clip_dir, "quantize", "--name", "onnx", fragments=("vlmopt convert",))


def test_quantizing_a_model_directory_that_does_not_exist_isassert_refused(tmp_path: Path) -> None:
    missing = tmp_path / "missing"

    result = vlmopt("quantize", missing)

    assert_bad_input(result, "does not exist")
    assert not missing.exists()


# -- quantize: calibration data ---------------------------------------------------------------------
def _image(path: Path) -> Path:
    from PIL import Image

    Image.fromarray(np.full((40, 40, 3), 128, dtype=np.uint8)).save(path)
    return path


def test_calibration_folder_without_images_isassert_refused(tmp_path: Path, clip_dir: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "notes.txt").write_text("no images here")

    assert_refused(clip_dir, "quantize", "--mode", "int8-static", "--calib-images", folder, fragments=("holds no images",))


def test_calibration_images_that_are_not_a_folder_areassert_refused(tmp_path: Path, clip_dir: Path) -> None:
    assert_refused(clip_dir, "quantize", "--mode", "int8-static", "--calib-images", tmp_path / "missing", fragments=("not a folder",))


def test_a_corrupt_calibration_image_is_refused_by_name(tmp_path: Path, clip_dir: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    _image(folder / "good.png")
    (folder / "broken.jpg").write_bytes(np.random.default_rng(0).bytes(2048))

    assert_refused(clip_dir, "quantize", "--mode", "int8-static", "--calib-images", folder, fragments=("broken.jpg", "cannot be read"))


def test_an_oversized_calibration_image_is_refused_by_the_decompression_bomb_limit(tmp_path: Path, clip_dir: Path) -> None:
    """90 megapixels of one-bit PNG: a few kilobytes on disk, over Pillow's 89.5 MP limit once decoded."""
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("1", (10000, 9000)).save(folder / "huge.png")
    assert (folder / "huge.png").stat().st_size < 100_000

    assert_refused(clip_dir, "quantize", "--mode", "int8-static", "--calib-images", folder, fragments=("huge.png", "limit"))


def test_a_prompt_file_of_only_blank_lines_isassert_refused(tmp_path: Path, clip_dir: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n   \n\t\n\n")

    assert_refused(clip_dir, "quantize", "--mode", "int8-static", "--calib-text", prompts, fragments=("has no prompts",))


def test_a_prompt_file_that_is_not_utf8_isassert_refused(tmp_path: Path, clip_dir: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a photo of a caf\xe9\n\xff\xfe\n")

    assert_refused(clip_dir, "quantize", "--mode", "int8-static", "--calib-text", prompts, fragments=("UTF-8",))


def test_a_prompt_file_that_does_not_exist_isassert_refused(tmp_path: Path, clip_dir: Path) -> None:
    assert_refused(clip_dir, "quantize", "--mode", "int8-static", "--calib-text", tmp_path / "missing.txt", fragments=("not a file",))


def test_calibration_images_for_a_model_without_an_image_tower_areassert_refused(
    tmp_path: Path, converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    _image(folder / "a.png")

    assert_refused(copy_model_dir(converted("bert")), "quantize", "--mode", "int8-static", "--calib-images", folder, fragments=("no image tower",))


def test_calibration_prompts_for_a_model_without_a_text_tower_areassert_refused(
    tmp_path: Path, converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n")

    assert_refused(copy_model_dir(converted("vit")), "quantize", "--mode", "int8-static", "--calib-text", prompts, fragments=("no text tower",))


def test_calibration_prompts_for_a_model_exported_without_a_tokenizer_areassert_refused(
    tmp_path: Path, converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]
) -> None:
    """The demo SigLIP ships no tokenizer (nor image processor): its `hf` folder holds only config and weights."""
    model_dir = copy_model_dir(converted("siglip"))
    assert not list((model_dir / "hf").glob("tokenizer*"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n")

    assert_refused(model_dir, "quantize", "--mode", "int8-static", "--calib-text", prompts, fragments=("tokenizer",))


def test_calibration_images_for_a_model_exported_without_an_image_processor_areassert_refused(
    tmp_path: Path, converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    _image(folder / "a.png")

    assert_refused(copy_model_dir(converted("siglip")), "quantize", "--mode", "int8-static", "--calib-images", folder, fragments=("image processor",))


# -- optimize ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (("--model-type", "gpt9"), "--model-type"),
        (("--atol", "0"), "--atol"),
        (("--min-cosine", "-0.5"), "--min-cosine"),
        (("--min-cosine", "1.5"), "--min-cosine"),
        (("--min-cosine", "nan"), "--min-cosine"),
        (("--from", "hf"), "vlmopt convert"),
        (("--name", "hf"), "vlmopt export"),
    ],
    ids=["unknown-model-type", "atol-0", "min-cosine-negative", "min-cosine-1.5", "min-cosine-nan", "from-hf", "over-hf"],
)
def test_optimize_with_an_invalid_flag_value_isassert_refused(flags: tuple[str, ...], fragment: str, clip_dir: Path) -> None:
    assert_refused(clip_dir, "optimize", *flags, fragments=(fragment,))


def test_optimizing_the_optimized_artifact_again_isassert_refused(variants_dir: Path) -> None:
    assert_refused(variants_dir, "optimize", "--from", "onnx-opt", "--name", "onnx-opt2", fragments=("already optimized",))


def test_optimizing_an_fp16_artifact_isassert_refused(variants_dir: Path) -> None:
    assert_refused(variants_dir, "optimize", "--from", "fp16", "--name", "fp16-opt", fragments=("fp16",))
