"""LLaVA-NeXT and LLaVA-OneVision end to end on the tiny demos: any-resolution tiles through the vision part, the packing
(unpad, OneVision's bilinear shrink, image newlines) inside it, verified greedy generation, per-part quantization, and
the input a user can get wrong."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import assert_bad_input, assert_refused, manifest, vlmopt, vlmopt_json
from generative import PARTS, PROMPTS, greedy, onnx_verification, picture_file, preprocessor_of, quantize_parts
from vlmopt.samples import sample_image

FAMILIES = ("llava_next", "llava_onevision")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def model(converted: Callable[[str], Path], family: str) -> Path:
    """The family's tiny demo as `convert` makes it by default."""
    return converted(family)


@pytest.fixture(scope="module")
def images() -> list[Any]:
    """A square and a wide picture: different tile grids (OneVision shrinks the square one's 6x6 grid), different token counts."""
    return [sample_image(11), sample_image(12).resize((256, 96))]


@pytest.fixture(scope="module")
def image_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return picture_file(tmp_path_factory.mktemp("llava-next-images"), 13, (256, 96))


# -- the packing -----------------------------------------------------------------------------------
def test_the_vision_part_packs_two_image_sizes_as_transformers_pack_image_features_does(model: Path, images: list[Any]) -> None:
    from vlmopt.hf import load_model
    from vlmopt.runners.generate import HfGenerateRunner, OrtParts

    preprocessor = preprocessor_of(model)
    reference = load_model(model / "hf")
    parts = OrtParts(model / "onnx", PARTS, threads=1, contract=preprocessor.contract)
    tiles, rows = [], []
    for image in images:
        pixels, extra, sizes = preprocessor.images([image])
        expected = HfGenerateRunner(model=reference, family=preprocessor.family).encode_images(pixels, extra, sizes)
        got = parts.encode_images(pixels, extra)
        tiles.append(len(pixels))
        rows.append(len(got))

        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=1e-5)
    assert tiles[0] != tiles[1] and rows[0] != rows[1]


def test_onevision_shrinks_a_grid_over_its_anyres_max_tiles_bilinearly(demo_source: Callable[[str], Path]) -> None:
    from vlmopt.families.llava_next import IMAGE_WEIGHTS, LlavaOnevisionFamily

    preprocessor = LlavaOnevisionFamily().preprocessor(demo_source("llava_onevision"))
    square, extra, _ = preprocessor.images([sample_image(11)])  # a 6x6 grid: 36 tiles' worth, shrunk to about 9
    taps = (extra[IMAGE_WEIGHTS] > 0).sum(axis=1)

    assert len(square) == 37
    assert taps.max() == 4  # rows between four grid cells: bilinear
    assert len(extra[IMAGE_WEIGHTS]) < 37 * 16


def test_a_prompt_holds_transformers_image_sizes_apart_from_what_the_vision_part_takes(
    demo_source: Callable[[str], Path], family: str, images: list[Any]
) -> None:
    from vlmopt.families import family_named
    from vlmopt.families.llava_next import BATCH_NUM_IMAGES, IMAGE_ROWS, IMAGE_SIZES, IMAGE_WEIGHTS

    preprocessor = family_named(family).preprocessor(demo_source(family))
    prompt = preprocessor(list(PROMPTS), images, images_per_prompt=[1, 1])

    assert set(prompt.vision_inputs) == set(preprocessor.contract.vision.takes) - {"pixel_values"} == {IMAGE_ROWS, IMAGE_WEIGHTS}
    assert set(prompt.reference_inputs) == ({IMAGE_SIZES, BATCH_NUM_IMAGES} if family == "llava_onevision" else {IMAGE_SIZES})


def test_a_onevision_prompt_of_two_images_takes_one_tile_of_each(demo_source: Callable[[str], Path], images: list[Any]) -> None:
    from vlmopt.families.llava_next import LlavaOnevisionFamily

    preprocessor = LlavaOnevisionFamily().preprocessor(demo_source("llava_onevision"))
    prompt = preprocessor("<image><image> Compare them.", images)

    assert len(prompt.pixel_values) == 2
    assert int((prompt.input_ids == preprocessor.image_token_id).sum()) == 2 * (16 + 1)  # each tile's rows and a newline


# -- convert and generate --------------------------------------------------------------------------
def test_export_reads_a_checkpoint_saved_with_save_pretrained(exported: Callable[[str], Path], family: str) -> None:
    hf = manifest(exported(family))["artifacts"]["hf"]

    assert hf["traits"]["family"] == family


def test_convert_verifies_every_part_and_greedy_generation_against_transformers(model: Path) -> None:
    verification, against_transformers, metrics = onnx_verification(model)

    assert against_transformers == {"vision", "embedding", "decoder"}
    assert verification["passed"] and verification["failures"] == []
    assert metrics["greedy generation identical to transformers"]["value"] == 1.0


@pytest.mark.parametrize("which", [0, 1])
def test_greedy_generation_equals_transformers_on_images_of_different_sizes(model: Path, images: list[Any], which: int) -> None:
    expected, got = greedy(model, [PROMPTS[which]], [images[which]])

    assert got == expected and len(got[0]) == 16


def test_a_left_padded_batch_of_two_unequal_prompts_generates_what_transformers_generates(model: Path, images: list[Any]) -> None:
    expected, got = greedy(model, list(PROMPTS), images)

    assert got == expected and len(got) == 2


def test_generate_runs_the_onnx_parts_through_vlmopts_loop(model: Path, image_file: Path) -> None:
    result = vlmopt_json("generate", model, "--image", image_file, "--prompt", "Describe this image.", "--max-new-tokens", 8)

    assert result["backend"] == "onnxruntime" and 1 <= len(result["tokens"]) <= 8


def test_generate_with_onnxruntime_genai_is_refused_in_one_line(model: Path, image_file: Path, family: str) -> None:
    assert_refused(model, "generate", "--image", image_file, "--prompt", "Describe.", "--backend", "onnxruntime-genai", fragments=("onnxruntime-genai", family))


def test_quantize_parts_decoder_int4_and_vision_int8_records_token_agreement_and_perplexity(
    tmp_path_factory: pytest.TempPathFactory, converted: Callable[[str], Path], image_file: Path
) -> None:
    model_dir, name, metrics = quantize_parts(converted("llava_onevision"), tmp_path_factory.mktemp("onevision-quantized"))

    assert {"teacher-forced next-token top-1 agreement", "perplexity increase", "greedy exact-match rate"} <= set(metrics)
    result = vlmopt_json("generate", model_dir, name, "--image", image_file, "--prompt", "Describe.", "--max-new-tokens", 4)
    assert len(result["tokens"]) >= 1


# -- bad input -------------------------------------------------------------------------------------
def test_more_images_than_the_prompt_has_image_markers_is_refused(model: Path, image_file: Path) -> None:
    assert_refused(model, "generate", "--image", image_file, "--image", image_file, "--prompt", "<image> Describe.", fragments=("1 <image> marker", "2 image"))


def test_a_checkpoint_whose_feature_strategy_leaves_a_class_token_beside_the_grid_is_refused(demo_source: Callable[[str], Path], tmp_path: Path) -> None:
    source = tmp_path / "disagreeing"
    shutil.copytree(demo_source("llava_next"), source)
    config = json.loads((source / "config.json").read_text())
    config["vision_feature_select_strategy"] = "full"  # CLIP's class token would be packed as a grid cell
    (source / "config.json").write_text(json.dumps(config))

    result = vlmopt("export", source, "-o", tmp_path / "out")

    assert_bad_input(result, "vision_feature_select_strategy", "disagree")
    assert not (tmp_path / "out").exists()


def test_a_processor_that_counts_tokens_for_another_aspect_ratio_than_the_config_is_refused(demo_source: Callable[[str], Path], tmp_path: Path) -> None:
    source = Path(shutil.copytree(demo_source("llava_onevision"), tmp_path / "disagreeing"))
    settings = source / "processor_config.json"
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "vision_aspect_ratio": "anyres_max_4"}))
    vlmopt_json("export", source, "-o", tmp_path / "model")

    assert_refused(tmp_path / "model", "convert", fragments=("vision_aspect_ratio", "anyres_max_4", "disagree"))
