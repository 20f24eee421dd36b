"""SmolVLM / Idefics3 end to end on the tiny demo: tiles through the vision part, verified greedy generation, per-part quantization."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import assert_bad_input, assert_refused, manifest, vlmopt, vlmopt_json
from generative import PROMPTS, greedy, onnx_verification, picture_file, quantize_parts
from vlmopt.samples import sample_image


@pytest.fixture(scope="module")
def smolvlm(converted: Callable[[str], Path]) -> Path:
    """The tiny SmolVLM as `convert` makes it by default (its decoder from onnxruntime-genai's builder)."""
    return converted("smolvlm")


@pytest.fixture(scope="module")
def images() -> list[Any]:
    """Two pictures of different shapes: the tiny processor splits them into 3x3 and 3x2 tiles, plus the whole image."""
    return [sample_image(11), sample_image(12).resize((256, 96))]


@pytest.fixture(scope="module")
def image_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return picture_file(tmp_path_factory.mktemp("smolvlm-images"), 13, (256, 96))


def test_the_processor_splits_images_of_different_sizes_into_different_tile_counts(smolvlm: Path, images: list[Any]) -> None:
    from vlmopt.families.smolvlm import SmolVlmPreprocessor

    preprocessor = SmolVlmPreprocessor(smolvlm / "hf")
    tiles = [len(preprocessor(PROMPTS[0], [image]).pixel_values) for image in images]

    assert tiles == [10, 7]


def test_the_part_checks_send_one_tile_per_image_and_leave_the_processor_splitting_after(smolvlm: Path, images: list[Any]) -> None:
    from vlmopt.families.smolvlm import SmolVlmFamily, SmolVlmPreprocessor

    preprocessor = SmolVlmPreprocessor(smolvlm / "hf")
    with preprocessor.image_processor_settings(SmolVlmFamily.part_check_image_processor):
        inside = len(preprocessor(PROMPTS[0], [images[0]]).pixel_values)
    after = len(preprocessor(PROMPTS[0], [images[0]]).pixel_values)

    assert (inside, after) == (1, 10)


def test_convert_verifies_every_part_and_greedy_generation_against_transformers(smolvlm: Path) -> None:
    verification, against_transformers, metrics = onnx_verification(smolvlm)

    assert against_transformers == {"vision", "embedding", "decoder"}
    assert verification["passed"] and verification["failures"] == []
    assert metrics["greedy generation identical to transformers"]["value"] == 1.0


def test_onnxruntime_genai_runs_no_smolvlm_so_convert_writes_no_genai_config(smolvlm: Path) -> None:
    runtime = manifest(smolvlm)["artifacts"]["onnx"]["record"]["runtime"]

    assert runtime["genai_config"] is None
    assert not (smolvlm / "onnx" / "genai_config.json").exists()


@pytest.mark.parametrize("which", [0, 1])
def test_greedy_generation_equals_transformers_on_images_of_different_tile_counts(smolvlm: Path, images: list[Any], which: int) -> None:
    expected, got = greedy(smolvlm, [PROMPTS[which]], [images[which]])

    assert got == expected and len(got[0]) == 16


def test_a_left_padded_batch_of_two_unequal_prompts_generates_what_transformers_generates(smolvlm: Path, images: list[Any]) -> None:
    expected, got = greedy(smolvlm, list(PROMPTS), images)

    assert got == expected and len(got) == 2


def test_generate_runs_the_onnx_parts_through_vlmopts_loop(smolvlm: Path, image_file: Path) -> None:
    result = vlmopt_json("generate", smolvlm, "--image", image_file, "--prompt", "Describe this image.", "--max-new-tokens", 8)

    assert result["backend"] == "onnxruntime" and 1 <= len(result["tokens"]) <= 8
    assert result["prompt_tokens"] > 7 * 4  # 7 tiles of 4 image tokens, and the chat template


def test_generate_with_onnxruntime_genai_is_refused_in_one_line(smolvlm: Path, image_file: Path) -> None:
    assert_refused(
        smolvlm, "generate", "--image", image_file, "--prompt", "Describe.", "--backend", "onnxruntime-genai", fragments=("onnxruntime-genai", "smolvlm")
    )


def test_quantize_parts_decoder_int4_and_vision_int8_records_token_agreement_and_perplexity(
    tmp_path_factory: pytest.TempPathFactory, smolvlm: Path, image_file: Path
) -> None:
    model_dir, name, metrics = quantize_parts(smolvlm, tmp_path_factory.mktemp("smolvlm-quantized"))

    assert {"teacher-forced next-token top-1 agreement", "perplexity increase", "greedy exact-match rate"} <= set(metrics)
    result = vlmopt_json("generate", model_dir, name, "--image", image_file, "--prompt", "Describe.", "--max-new-tokens", 4)
    assert len(result["tokens"]) >= 1


def test_an_idefics3_checkpoint_generates_with_transformers_through_the_same_family(tmp_path: Path, image_file: Path) -> None:
    built = vlmopt("demo-model", tmp_path / "src", "--family", "idefics3")
    assert built.exit_code == 0, built.stderr
    vlmopt_json("export", tmp_path / "src", "-o", tmp_path / "model")

    result = vlmopt_json("generate", tmp_path / "model", "--image", image_file, "--prompt", "Describe this image.", "--max-new-tokens", 4)

    assert manifest(tmp_path / "model")["artifacts"]["hf"]["traits"]["family"] == "smolvlm"
    assert result["backend"] == "transformers" and len(result["tokens"]) >= 1


# -- bad input -------------------------------------------------------------------------------------
def test_more_images_than_the_prompt_has_image_markers_is_refused(smolvlm: Path, image_file: Path) -> None:
    assert_refused(
        smolvlm, "generate", "--image", image_file, "--image", image_file, "--prompt", "<image> Describe.", fragments=("1 <image> marker", "2 image")
    )


def test_a_checkpoint_whose_image_token_is_outside_its_text_vocabulary_is_refused(demo_source: Callable[[str], Path], tmp_path: Path) -> None:
    source = tmp_path / "disagreeing"
    shutil.copytree(demo_source("smolvlm"), source)
    config = json.loads((source / "config.json").read_text())
    config["image_token_id"] = config["text_config"]["vocab_size"] + 5
    (source / "config.json").write_text(json.dumps(config))

    result = vlmopt("export", source, "-o", tmp_path / "out")

    assert_bad_input(result, "image token id", "vocabulary", "disagree")
    assert not (tmp_path / "out").exists()
