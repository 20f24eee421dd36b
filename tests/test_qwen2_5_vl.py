"""Qwen2.5-VL end to end on the tiny demo: patches + image_grid_thw through the vision part, M-RoPE positions in the
loop, greedy generation token for token against transformers, per-part quantization, bad input."""

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


@pytest.fixture(scope="module")
def qwen(converted: Callable[[str], Path]) -> Path:
    return converted("qwen2_5_vl")


@pytest.fixture(scope="module")
def images() -> list[Any]:
    """Two pictures of different sizes: 16x16 and 6x14 patches, so 64 and 21 image tokens."""
    return [sample_image(11), sample_image(12).resize((200, 90))]


@pytest.fixture(scope="module")
def image_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return picture_file(tmp_path_factory.mktemp("qwen-images"), 13, (200, 90))


def test_images_of_different_sizes_take_different_numbers_of_image_tokens(qwen: Path, images: list[Any]) -> None:
    preprocessor = preprocessor_of(qwen)
    prompts = [preprocessor(PROMPTS[0], [image]) for image in images]

    assert [p.vision_inputs["image_grid_thw"].tolist() for p in prompts] == [[[1, 16, 16]], [[1, 6, 14]]]
    assert [int((p.input_ids == preprocessor.image_token_id).sum()) for p in prompts] == [64, 21]


def test_prompt_positions_are_transformers_own_m_rope_positions_and_deltas(qwen: Path, images: list[Any]) -> None:
    import torch

    from vlmopt.hf import load_model

    preprocessor = preprocessor_of(qwen)
    prompt = preprocessor(list(PROMPTS), images, images_per_prompt=[1, 1])
    model = load_model(qwen / "hf")
    expected, _ = model.model.get_rope_index(
        torch.from_numpy(prompt.input_ids),
        mm_token_type_ids=torch.from_numpy(prompt.reference_inputs["mm_token_type_ids"]),
        image_grid_thw=torch.from_numpy(prompt.vision_inputs["image_grid_thw"]),
        attention_mask=torch.from_numpy(prompt.attention_mask),
    )

    assert prompt.position_ids.shape == (3, 2, prompt.input_ids.shape[1])
    assert np.array_equal(prompt.position_ids, expected.numpy())
    assert not np.array_equal(prompt.position_ids[1], prompt.position_ids[2])  # the image rows and columns differ


def test_convert_verifies_every_part_and_greedy_generation_against_transformers(qwen: Path) -> None:
    verification, against_transformers, metrics = onnx_verification(qwen)

    assert against_transformers == {"vision", "embedding", "decoder"}
    assert verification["passed"] and verification["failures"] == []
    assert metrics["greedy generation identical to transformers"]["value"] == 1.0


def test_the_decoder_part_takes_three_axis_position_ids(qwen: Path) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(qwen / "onnx" / "decoder.onnx"), providers=["CPUExecutionProvider"])
    shape = next(i.shape for i in session.get_inputs() if i.name == "position_ids")

    assert shape[0] == 3 and len(shape) == 3


def test_a_calibration_prefill_gives_the_decoder_text_positions_on_all_three_m_rope_axes(qwen: Path) -> None:
    """What `quantize` calibrates a decoder on (--prefill int8-dynamic's outlier channels, --method awq/gptq):
    its text positions on each of M-RoPE's three axes, as the loop gives a text prompt."""
    from vlmopt.quantization import int4
    from vlmopt.runners.generate import OrtParts, ort_session

    parts = OrtParts(qwen / "onnx", PARTS, threads=1, contract=preprocessor_of(qwen).contract)
    decoder = ort_session(qwen / "onnx" / "decoder.onnx", 1)
    embeds = parts.embed(np.arange(3, 12, dtype=np.int64)[None])

    feed = int4.prefill_feed(decoder, embeds)

    np.testing.assert_allclose(decoder.run(["logits"], feed)[0], parts.decode(embeds, np.ones((1, 9), np.int64)), rtol=0, atol=1e-5)


def test_the_onnx_vision_part_equals_transformers_at_two_image_sizes_and_two_images(qwen: Path, images: list[Any]) -> None:
    from vlmopt.hf import load_model
    from vlmopt.runners.generate import HfGenerateRunner, OrtParts

    preprocessor = preprocessor_of(qwen)
    model = load_model(qwen / "hf", attn_implementation="eager")
    parts = OrtParts(qwen / "onnx", PARTS, threads=1, contract=preprocessor.contract)
    for batch in ([images[0]], [images[1]], images):
        pixels, extra, reference = preprocessor.images(batch)
        expected = HfGenerateRunner(model=model, family=preprocessor.family).encode_images(pixels, extra, reference)
        got = parts.encode_images(pixels, extra)

        assert got.shape == expected.shape == (int(np.prod(extra["image_grid_thw"], -1).sum()) // 4, 64)
        assert np.abs(got - expected).max() < 1e-5


def test_the_vision_parts_patch_embedding_is_a_matmul_that_int8_dynamic_quantizes(qwen: Path) -> None:
    from vlmopt import graph
    from vlmopt.stages.quantize import QuantizeOptions, int8_dynamic

    before = graph.op_counts(graph.load_structure(qwen / "onnx" / "vision.onnx"))
    int8 = qwen / "vision-int8.onnx"
    int8_dynamic(qwen / "onnx" / "vision.onnx", int8, QuantizeOptions(split_outliers=0))
    readers = {n.op_type for n in graph.load_structure(int8).graph.node if "pixel_values" in n.input}

    assert not before.get("Conv") and not before.get("ConvInteger")
    assert readers & {"DynamicQuantizeLinear", "DynamicQuantizeMatMul"}  # the patches are quantized for an int8 MatMul


@pytest.mark.parametrize("which", [0, 1])
def test_greedy_generation_equals_transformers_on_images_of_different_sizes(qwen: Path, images: list[Any], which: int) -> None:
    expected, got = greedy(qwen, [PROMPTS[which]], [images[which]])

    assert got == expected and len(got[0]) == 16


def test_a_left_padded_batch_of_two_unequal_prompts_generates_what_transformers_generates(qwen: Path, images: list[Any]) -> None:
    expected, got = greedy(qwen, list(PROMPTS), images)

    assert got == expected and len(got) == 2


def test_a_text_only_batch_of_two_generates_what_transformers_generates(qwen: Path) -> None:
    expected, got = greedy(qwen, ["Describe a cat.", "What is a color? Answer briefly, then explain."], [])

    assert got == expected and len(got) == 2


def test_generate_runs_the_onnx_parts_through_vlmopts_loop(qwen: Path, image_file: Path) -> None:
    result = vlmopt_json("generate", qwen, "--image", image_file, "--prompt", "Describe this image.", "--max-new-tokens", 8)

    assert result["backend"] == "onnxruntime" and 1 <= len(result["tokens"]) <= 8
    assert result["prompt_tokens"] > 21  # the image's 21 tokens and the chat template


def test_onnxruntime_genai_generates_what_transformers_generates_on_images_of_different_sizes(qwen: Path, images: list[Any]) -> None:
    from vlmopt.runners.genai import GenaiGenerateRunner
    from vlmopt.runners.generate import GenerateRequest, HfGenerateRunner

    preprocessor = preprocessor_of(qwen)
    tall = sample_image(5).resize((150, 260))  # 18x10 patches: rows and columns differ the other way
    prompts = [preprocessor(text, [image]) for text, image in zip((*PROMPTS, "A cat? Answer briefly."), (*images, tall), strict=True)]
    requests = [GenerateRequest(p, 16, preprocessor.eos_token_ids, preprocessor.pad_token_id, min_new_tokens=16) for p in prompts]
    with HfGenerateRunner(qwen / "hf", threads=1) as hf, GenaiGenerateRunner(qwen / "onnx", preprocessor.image_token_id, threads=1) as genai:
        expected = [hf.generate(r).tokens for r in requests]
        got = [genai.generate(r).tokens for r in requests]

    assert got == expected


def test_convert_records_onnxruntime_genai_generation_identical_to_transformers(qwen: Path) -> None:
    metrics = {m["name"]: m for m in manifest(qwen)["artifacts"]["onnx"]["verification"]["metrics"]}
    config = json.loads((qwen / "onnx" / "genai_config.json").read_text())

    assert config["model"]["type"] == "qwen2_5_vl" and "image_grid_thw" in config["model"]["vision"]["inputs"]
    assert metrics["onnxruntime-genai generation identical to transformers"]["value"] == 1.0


def test_generate_with_onnxruntime_genai_runs_the_parts(qwen: Path, image_file: Path) -> None:
    result = vlmopt_json("generate", qwen, "--image", image_file, "--prompt", "Describe this image.", "--max-new-tokens", 4, "--backend", "onnxruntime-genai")

    assert result["backend"] == "onnxruntime-genai" and 1 <= len(result["tokens"]) <= 4


def test_a_decoder_from_onnxruntime_genais_builder_is_refused_in_one_line(qwen: Path) -> None:
    assert_refused(qwen, "convert", "--decoder", "builder", "--name", "onnx-builder", fragments=("qwen2_5_vl_text", "--decoder torch"))


def test_an_image_smaller_than_the_28_px_merge_unit_is_scaled_up_by_the_processor(qwen: Path, tmp_path: Path) -> None:
    tiny = tmp_path / "tiny.png"
    sample_image(14).resize((12, 9)).save(tiny)

    result = vlmopt_json("generate", qwen, "--image", tiny, "--prompt", "Describe.", "--max-new-tokens", 2)

    assert 1 <= len(result["tokens"]) <= 2 and result["prompt_tokens"] > 4  # at least 56x56 px: 4 image tokens


def test_quantize_parts_decoder_int4_and_vision_int8_records_token_agreement_and_perplexity(
    tmp_path_factory: pytest.TempPathFactory, qwen: Path, image_file: Path
) -> None:
    model_dir, name, metrics = quantize_parts(qwen, tmp_path_factory.mktemp("qwen-quantized"))

    assert {"teacher-forced next-token top-1 agreement", "perplexity increase", "greedy exact-match rate"} <= set(metrics)
    assert 0.0 <= metrics["teacher-forced next-token top-1 agreement"]["value"] <= 1.0
    result = vlmopt_json("generate", model_dir, name, "--image", image_file, "--prompt", "Describe.", "--max-new-tokens", 4)
    assert len(result["tokens"]) >= 1


# -- bad input -------------------------------------------------------------------------------------
def test_more_images_than_the_prompt_has_image_markers_is_refused(qwen: Path, image_file: Path) -> None:
    assert_refused(
        qwen, "generate", "--image", image_file, "--image", image_file, "--prompt", "<|image_pad|> Describe.", fragments=("1 <|image_pad|> marker", "2 image")
    )


def test_a_raw_prompt_whose_image_tokens_do_not_match_the_image_is_refused(qwen: Path, image_file: Path) -> None:
    raw = "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>Describe.<|im_end|>\n<|im_start|>assistant\n"

    assert_refused(qwen, "generate", "--image", image_file, "--raw-prompt", "--prompt", raw, fragments=("2 <|image_pad|> marker", "1 image"))


def test_an_image_200_times_longer_than_wide_is_refused(qwen: Path, tmp_path: Path) -> None:
    thin = tmp_path / "thin.png"
    sample_image(15).resize((600, 2)).save(thin)

    assert_refused(qwen, "generate", "--image", thin, "--prompt", "Describe.", fragments=("600x2", "200 times"))


@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        (lambda c: c["vision_config"].update(out_hidden_size=48), ("out_hidden_size 48", "hidden_size is 64")),
        (lambda c: c.update(image_token_id=c["text_config"]["vocab_size"] + 5), ("image token id", "vocabulary", "disagree")),
    ],
    ids=["vision-out-hidden-size", "image-token-id"],
)
def test_a_checkpoint_whose_vision_and_text_configs_disagree_is_refused(
    demo_source: Callable[[str], Path], tmp_path: Path, edit: Any, fragments: tuple[str, ...]
) -> None:
    source = tmp_path / "disagreeing"
    shutil.copytree(demo_source("qwen2_5_vl"), source)
    config = json.loads((source / "config.json").read_text())
    edit(config)
    (source / "config.json").write_text(json.dumps(config))

    result = vlmopt("export", source, "-o", tmp_path / "out")

    assert_bad_input(result, *fragments)
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_whose_image_token_differs_from_the_configs_is_refused(demo_source: Callable[[str], Path], tmp_path: Path) -> None:
    from vlmopt.errors import VlmoptError
    from vlmopt.families.qwen2_5_vl import Qwen2_5_VlPreprocessor

    source = tmp_path / "disagreeing"
    shutil.copytree(demo_source("qwen2_5_vl"), source)
    config = json.loads((source / "config.json").read_text())
    config["image_token_id"] = config["video_token_id"]
    (source / "config.json").write_text(json.dumps(config))

    with pytest.raises(VlmoptError, match=r"image_token_id=\d+; the checkpoint's tokenizer and config disagree") as raised:
        Qwen2_5_VlPreprocessor(source)

    assert "\n" not in str(raised.value)


def test_a_save_pretrained_folder_exports_as_qwen2_5_vl(demo_source: Callable[[str], Path], tmp_path: Path) -> None:
    made = vlmopt_json("export", demo_source("qwen2_5_vl"), "-o", tmp_path / "model")

    traits = manifest(tmp_path / "model")["artifacts"]["hf"]["traits"]
    assert made["artifact"]["name"] == "hf" and (traits["family"], traits["model_type"]) == ("qwen2_5_vl", "qwen2_5_vl")


def test_the_3b_demo_has_qwen2_5_vl_3bs_sizes_without_being_built() -> None:
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from vlmopt.demo_qwen2_5_vl import QWEN_VOCAB_SIZE, text_config, vision_config

    text = text_config("3b", QWEN_VOCAB_SIZE)
    config = Qwen2_5_VLConfig(vision_config=vision_config("3b", text["hidden_size"]), text_config=text, tie_word_embeddings=True)
    with torch.device("meta"):  # shapes only: no memory for 15 GB of weights
        model = Qwen2_5_VLForConditionalGeneration(config)

    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == 3.75


def test_the_3b_4l_demo_keeps_the_3bs_widths_with_4_layers_a_part() -> None:
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from vlmopt.demo_qwen2_5_vl import QWEN_VOCAB_SIZE, text_config, vision_config

    text, vision = text_config("3b-4l", QWEN_VOCAB_SIZE), vision_config("3b-4l", 2048)
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=True)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)

    assert {k: text[k] for k in ("hidden_size", "intermediate_size", "num_key_value_heads")} == {
        k: text_config("3b", QWEN_VOCAB_SIZE)[k] for k in ("hidden_size", "intermediate_size", "num_key_value_heads")
    }
    assert (text["num_hidden_layers"], vision["depth"], vision["hidden_size"]) == (4, 4, 1280)
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == 0.74
