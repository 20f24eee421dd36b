"""BLIP captioning end to end on the tiny demo: the encoder-decoder split (vision, cross-attention keys/values once,
text decoder with a self-attention cache), greedy captions token for token against transformers' generate, and the
input a user can get wrong."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import assert_bad_input, assert_refused, manifest, vlmopt, vlmopt_json
from vlmopt.samples import sample_image

PARTS = {"vision": "vision.onnx", "cross": "cross.onnx", "decoder": "decoder.onnx"}


@pytest.fixture(scope="module")
def model(converted: Callable[[str], Path]) -> Path:
    return converted("blip")


@pytest.fixture(scope="module")
def image_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("blip-images") / "wide.png"
    sample_image(13).resize((200, 60)).save(path)
    return path


def _greedy(model_dir: Path, prompts: list[str], images: list[Any], new_tokens: int = 12) -> tuple[list[list[int]], list[list[int]]]:
    """transformers' generate and vlmopt's ONNX Runtime loop on the same prompt: (expected, got)."""
    from vlmopt.families.blip import BlipFamily
    from vlmopt.runners.generate import GenerateRequest, HfGenerateRunner
    from vlmopt.runners.loops import ort_runner

    preprocessor = BlipFamily().preprocessor(model_dir / "hf")
    prompt = preprocessor(prompts, images)
    request = GenerateRequest(prompt, new_tokens, preprocessor.eos_token_ids, preprocessor.pad_token_id, min_new_tokens=new_tokens)
    with HfGenerateRunner(model_dir / "hf", threads=1) as hf, ort_runner(model_dir / "onnx", PARTS, 1, preprocessor.contract) as ort:
        return hf.generate(request).tokens, ort.generate(request).tokens


def test_export_reads_a_blip_checkpoint_saved_with_save_pretrained(exported: Callable[[str], Path]) -> None:
    assert manifest(exported("blip"))["artifacts"]["hf"]["traits"]["family"] == "blip"


def test_convert_verifies_the_parts_and_greedy_captions_against_transformers(model: Path) -> None:
    artifact = manifest(model)["artifacts"]["onnx"]
    verification = artifact["verification"]
    metrics = {m["name"]: m for m in verification["metrics"]}
    against_transformers = {tower for tower, checks in verification["towers"].items() if any(c["data"] == "transformers" for c in checks)}

    assert set(artifact["towers"]) == set(PARTS)
    assert against_transformers == {"vision", "decoder"}
    assert verification["passed"] and verification["failures"] == []
    assert metrics["greedy generation identical to transformers"]["value"] == 1.0


@pytest.mark.parametrize("prefix", ["", "a picture of"])
@pytest.mark.parametrize("size", [(64, 64), (200, 60)])
def test_greedy_captions_equal_transformers_on_two_image_sizes_and_two_prefixes(model: Path, prefix: str, size: tuple[int, int]) -> None:
    expected, got = _greedy(model, [prefix], [sample_image(21).resize(size)])

    assert got == expected and len(got[0]) == 12


def test_a_right_padded_batch_of_two_unequal_prefixes_generates_what_transformers_generates(model: Path) -> None:
    expected, got = _greedy(model, ["", "a photo of the red cat on the car"], [sample_image(22), sample_image(23).resize((60, 200))])

    assert got == expected and len(got) == 2


def test_generate_captions_through_vlmopts_loop(model: Path, image_file: Path) -> None:
    result = vlmopt_json("generate", model, "--image", image_file, "--prompt", "a picture of", "--max-new-tokens", 6)

    assert result["backend"] == "onnxruntime" and 1 <= len(result["tokens"]) <= 6


def test_generate_with_onnxruntime_genai_is_refused_in_one_line(model: Path, image_file: Path) -> None:
    assert_refused(model, "generate", "--image", image_file, "--prompt", "", "--backend", "onnxruntime-genai", fragments=("onnxruntime-genai", "blip"))


def test_quantize_parts_decoder_int4_and_vision_int8_records_token_agreement_and_perplexity(
    tmp_path_factory: pytest.TempPathFactory, model: Path, image_file: Path
) -> None:
    model_dir = tmp_path_factory.mktemp("blip-quantized") / "blip"
    shutil.copytree(model, model_dir)
    # random weights: the gates are off, the figures are still measured and recorded
    made = vlmopt_json(
        "quantize", model_dir, "--part", "decoder=int4", "--part", "vision=int8",
        "--min-token-agreement", "off", "--max-ppl-increase", "off", "--min-cosine", "off",
    )  # fmt: skip
    name = made["artifact"]["name"]
    metrics = {m["name"]: m for m in manifest(model_dir)["artifacts"][name]["verification"]["metrics"]}

    assert {"teacher-forced next-token top-1 agreement", "perplexity increase", "greedy exact-match rate"} <= set(metrics)
    assert metrics["teacher-forced next-token top-1 agreement"]["detail"]["positions"] > 1000
    result = vlmopt_json("generate", model_dir, name, "--image", image_file, "--prompt", "a picture of", "--max-new-tokens", 4)
    assert len(result["tokens"]) >= 1


# -- bad input -------------------------------------------------------------------------------------
def test_two_images_for_one_caption_prompt_are_refused(model: Path, image_file: Path) -> None:
    assert_refused(model, "generate", "--image", image_file, "--image", image_file, "--prompt", "a picture of", fragments=("one image per prompt",))


def test_a_checkpoint_whose_text_decoder_expects_other_image_rows_is_refused(demo_source: Callable[[str], Path], tmp_path: Path) -> None:
    source = Path(shutil.copytree(demo_source("blip"), tmp_path / "disagreeing"))
    config = json.loads((source / "config.json").read_text())
    config["text_config"]["encoder_hidden_size"] = 48
    (source / "config.json").write_text(json.dumps(config))

    result = vlmopt("export", source, "-o", tmp_path / "out")

    assert_bad_input(result, "encoder_hidden_size", "disagree")
    assert not (tmp_path / "out").exists()


def test_a_prefix_longer_than_the_decoders_positions_is_refused(model: Path, image_file: Path) -> None:
    assert_refused(
        model,
        "generate",
        "--image",
        image_file,
        "--prompt",
        "a photo of the cat " * 40,
        "--max-new-tokens",
        4,
        fragments=("exceeds the model's 128 positions",),
    )
