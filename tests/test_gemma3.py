"""Gemma 3 end to end on the tiny demo: three parts with a KV cache, image-block attention, sliding-window layers,
verified generation, per-part quantization, and the input a user can get wrong."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from conftest import assert_bad_input, assert_refused, manifest, vlmopt, vlmopt_json
from generative import PARTS, PROMPTS, greedy, preprocessor_of, quantize_parts
from vlmopt.samples import sample_image

MARKER = "<start_of_image>"


@pytest.fixture(scope="module")
def gemma3(converted: Callable[[str], Path]) -> Path:
    """The tiny gemma3 as `convert` makes it (decoder exported from PyTorch: the builder's attention is causal only)."""
    return converted("gemma3")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory, gemma3: Path) -> Path:
    """int4 decoder and int8 vision (gates off: random weights agree by chance only)."""
    gates_off = ("--min-token-agreement", "off", "--max-ppl-increase", "off")
    return quantize_parts(gemma3, tmp_path_factory.mktemp("gemma3-quantized"), gates_off)[0]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A square picture: one image, no crops."""
    sample_image(3).save(path := tmp_path_factory.mktemp("gemma3-images") / "picture.png")
    return path


def _axes(path: Path) -> dict[str, list[Any]]:
    model = onnx.load(str(path), load_external_data=False)
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in (*model.graph.input, *model.graph.output)}


# -- convert ---------------------------------------------------------------------------------------
def test_a_calibration_prefill_gives_the_decoder_text_token_types(gemma3: Path) -> None:
    """What `quantize` calibrates a decoder on (--prefill int8-dynamic's outlier channels, --method awq/gptq):
    token_type_ids 0 (text) on every position, as the loop gives a text prompt."""
    from vlmopt.quantization import int4
    from vlmopt.runners.generate import OrtParts, ort_session

    parts = OrtParts(gemma3 / "onnx", PARTS, threads=1, contract=preprocessor_of(gemma3).contract)
    decoder = ort_session(gemma3 / "onnx" / "decoder.onnx", 1)
    embeds = parts.embed(np.arange(3, 12, dtype=np.int64)[None])

    feed = int4.prefill_feed(decoder, embeds)

    np.testing.assert_allclose(decoder.run(["logits"], feed)[0], parts.decode(embeds, np.ones((1, 9), np.int64)), rtol=0, atol=1e-5)


def test_export_reads_a_gemma3_checkpoint_saved_with_save_pretrained(exported: Callable[[str], Path]) -> None:
    hf = manifest(exported("gemma3"))["artifacts"]["hf"]

    assert hf["traits"]["family"] == "gemma3"


def test_convert_writes_three_parts_whose_decoder_takes_token_type_ids(gemma3: Path) -> None:
    folder = gemma3 / "onnx"
    vision, decoder = _axes(folder / "vision.onnx"), _axes(folder / "decoder.onnx")
    record = manifest(gemma3)["artifacts"]["onnx"]["record"]

    assert vision["pixel_values"][0] == "num_images" and vision["image_features"][0] == "num_image_tokens"
    assert decoder["token_type_ids"] == ["batch", "sequence"] and decoder["position_ids"] == ["batch", "sequence"]
    assert decoder["past_key_values.0.key"] == ["batch", 2, "past_sequence", 16]  # one layout for the sliding and the global layer
    assert decoder["present.1.value"] == ["batch", 2, "total_sequence", 16]
    assert record["decoder"] == "torch"
    assert json.loads((folder / "genai_config.json").read_text())["model"]["type"] == "gemma3"


def test_convert_requires_greedy_generation_identical_to_transformers_generate(gemma3: Path) -> None:
    verification = manifest(gemma3)["artifacts"]["onnx"]["verification"]
    metrics = {m["name"]: m for m in verification["metrics"]}
    greedy = metrics["greedy generation identical to transformers"]

    assert verification["passed"] and greedy["threshold"] == 1.0 and greedy["value"] == 1.0
    assert greedy["detail"]["pairs"] >= 3 and greedy["detail"]["new_tokens"] >= 32
    decoder = next(check for check in verification["towers"]["decoder"] if check["data"] == "transformers")
    assert decoder["outputs"]["logits"]["max_abs_diff"] < 1e-4


def test_onnxruntime_genai_is_recorded_as_unable_to_feed_the_decoders_token_type_ids(gemma3: Path) -> None:
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is an optional runtime (pip install onnxruntime-genai)")
    metrics = {m["name"]: m for m in manifest(gemma3)["artifacts"]["onnx"]["verification"]["metrics"]}
    genai = metrics["onnxruntime-genai generation identical to transformers"]

    # onnxruntime-genai 0.18's multimodal pipeline runs the gemma3 type but gives the decoder no token_type_ids: recorded, not gated
    assert genai["value"] == 0.0 and "token_type_ids" in genai["detail"]["error"]


def test_the_decoder_lets_each_images_tokens_attend_to_each_other_both_ways_at_prefill(gemma3: Path) -> None:
    import torch

    from vlmopt.hf import load_model
    from vlmopt.runners.generate import OrtParts

    preprocessor = preprocessor_of(gemma3)
    prompt = preprocessor("Describe this image.", [sample_image(7)])
    types = prompt.decoder_inputs["token_type_ids"]
    parts = OrtParts(gemma3 / "onnx", PARTS, threads=1, contract=preprocessor.contract)
    embeds = parts.embed(prompt.input_ids, parts.encode_images(prompt.pixel_values))
    model = load_model(gemma3 / "hf")
    inputs = {"input_ids": torch.from_numpy(prompt.input_ids), "attention_mask": torch.from_numpy(prompt.attention_mask)}
    with torch.inference_mode():
        expected = model(**inputs, pixel_values=torch.from_numpy(prompt.pixel_values), token_type_ids=torch.from_numpy(types)).logits.numpy()

    both_ways = parts.decode(embeds, prompt.attention_mask, prompt.decoder_inputs)
    causal_only = parts.decode(embeds, prompt.attention_mask)

    assert types.sum() == 16  # the image's 16 tokens
    np.testing.assert_allclose(both_ways, expected, rtol=0, atol=1e-4)
    assert np.abs(causal_only - expected).max() > 1e-2  # the image-block attention changes the logits


def test_images_of_two_shapes_two_prompts_and_an_unequal_batch_generate_what_transformers_generates(gemma3: Path) -> None:
    preprocessor = preprocessor_of(gemma3)
    wide, square = sample_image(4).resize((200, 64)), sample_image(5)
    singles = [preprocessor(PROMPTS[0], [wide]), preprocessor(PROMPTS[1], [square])]
    batch = preprocessor(list(PROMPTS), [wide, square], images_per_prompt=[1, 1])
    # pan-and-scan splits the wide image into crops: 4 images of 16 tokens against the square one's 1
    assert [len(p.pixel_values) for p in singles] == [4, 1]
    assert [int((p.input_ids == preprocessor.image_token_id).sum()) for p in singles] == [64, 16]
    assert (batch.attention_mask == 0).any()  # the shorter prompt is padded

    for prompts, images in (([PROMPTS[0]], [wide]), ([PROMPTS[1]], [square]), (list(PROMPTS), [wide, square])):
        expected, got = greedy(gemma3, prompts, images)
        assert got == expected


def test_an_image_token_the_model_generates_is_embedded_as_a_token(gemma3: Path) -> None:
    import torch

    from vlmopt.families.gemma3 import Gemma3Family
    from vlmopt.hf import load_model
    from vlmopt.runners.generate import OrtParts

    token = preprocessor_of(gemma3).image_token_id
    ids = np.array([[5, token, 6]], np.int64)  # a decode step's ids: no image rows to write
    with torch.inference_mode():
        expected = Gemma3Family().input_embeddings(load_model(gemma3 / "hf"))(torch.from_numpy(ids)).numpy()

    got = OrtParts(gemma3 / "onnx", PARTS, threads=1).embed(ids)

    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


# -- generate and quantize -------------------------------------------------------------------------
def test_generate_from_hf_and_from_onnx_gives_the_same_greedy_tokens(gemma3: Path, image: Path) -> None:
    def run(artifact: str) -> dict[str, Any]:
        return vlmopt_json("generate", gemma3, artifact, "--image", image, "--prompt", "Describe this image.", "--max-new-tokens", 12)

    hf, onnx_run = run("hf"), run("onnx")

    assert hf["backend"] == "transformers" and onnx_run["backend"] == "onnxruntime"
    assert hf["tokens"] == onnx_run["tokens"] and len(hf["tokens"]) >= 1


def test_part_modes_quantize_the_decoder_to_int4_and_vision_to_int8_verified_by_agreement_and_perplexity(quantized: Path, image: Path) -> None:
    artifact = manifest(quantized)["artifacts"]["decoder-int4_vision-int8"]
    ops = {name: work["op_counts"] for name, work in artifact["record"]["towers"].items()}
    metrics = {m["name"]: m for m in artifact["verification"]["metrics"]}

    assert ops["decoder"].get("MatMulNBits", 0) > 0
    assert ops["vision"].get("MatMulInteger", 0) + ops["vision"].get("DynamicQuantizeMatMul", 0) > 0
    agreement = metrics["teacher-forced next-token top-1 agreement"]["detail"]
    assert agreement["positions"] > 200 and agreement["ppl_reference"] > 1 and agreement["ppl_candidate"] > 1
    assert metrics["greedy exact-match rate"]["detail"]["pairs"] >= 3
    result = vlmopt_json("generate", quantized, "decoder-int4_vision-int8", "--image", image, "--prompt", "Describe this image.", "--max-new-tokens", 4)
    assert len(result["tokens"]) >= 1


# -- bad input -------------------------------------------------------------------------------------
def test_more_images_than_the_prompt_marks_is_refused(gemma3: Path, image: Path) -> None:
    assert_refused(gemma3, "generate", "--image", image, "--image", image, "--prompt", f"{MARKER} Describe it.", fragments=("2 image(s)", MARKER))


def test_an_image_marker_without_an_image_is_refused(gemma3: Path) -> None:
    assert_refused(gemma3, "generate", "--prompt", f"{MARKER} Describe it.", fragments=("0 image(s)",))


def test_image_tokens_typed_into_the_prompt_are_refused(gemma3: Path, image: Path) -> None:
    assert_refused(gemma3, "generate", "--image", image, "--prompt", "Describe <image_soft_token> it.", fragments=("image tokens", "16 per image"))


def test_generating_under_onnxruntime_genai_which_feeds_no_token_type_ids_is_refused(gemma3: Path, image: Path) -> None:
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is an optional runtime (pip install onnxruntime-genai)")

    args = ("--backend", "onnxruntime-genai", "--image", image, "--prompt", "Describe it.")
    assert_refused(gemma3, "generate", "onnx", *args, fragments=("token_type_ids", "--backend onnxruntime"))


def test_the_builders_decoder_is_refused_for_gemma3(exported: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(exported("gemma3"))

    assert_refused(model_dir, "convert", "--decoder", "builder", fragments=("--decoder builder", "gemma3_text"))


def _edited_source(demo_source: Callable[[str], Path], tmp_path: Path, file: str, edit: Callable[[dict[str, Any]], None]) -> Path:
    source = tmp_path / "gemma3-edited"
    shutil.copytree(demo_source("gemma3"), source)
    data = json.loads((source / file).read_text())
    edit(data)
    (source / file).write_text(json.dumps(data))
    return source


def test_image_tokens_per_image_that_do_not_pool_the_patch_grid_are_refused(demo_source: Callable[[str], Path], tmp_path: Path) -> None:
    source = _edited_source(demo_source, tmp_path, "config.json", lambda c: c.update(mm_tokens_per_image=15))

    result = vlmopt("export", source, "-o", tmp_path / "out")

    assert_bad_input(result, "mm_tokens_per_image 15", "8x8 patches")
    assert not (tmp_path / "out").exists()


def test_a_processor_that_expands_images_to_another_token_count_than_the_config_is_refused(demo_source: Callable[[str], Path], tmp_path: Path) -> None:
    source = _edited_source(demo_source, tmp_path, "processor_config.json", lambda c: c.update(image_seq_length=9))
    model_dir = tmp_path / "model"
    vlmopt_json("export", source, "-o", model_dir)

    assert_refused(model_dir, "convert", fragments=("9 tokens", "mm_tokens_per_image=16"))
