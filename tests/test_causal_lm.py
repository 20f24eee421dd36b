"""Bare causal language models (llama, qwen2, mistral, gemma3_text) as a family: the generative contract with no vision
part, through export, convert, quantize --part decoder=..., generate (a prompt, no image) and bench."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import assert_refused, manifest, vlmopt, vlmopt_json
from vlmopt.verification.generation import GENERATION_IDENTICAL

GATES_OFF = ("--min-token-agreement", "off", "--max-ppl-increase", "off")


def _metrics(model_dir: Path, artifact: str) -> dict[str, float]:
    record = manifest(model_dir)["artifacts"][artifact]["verification"]
    return {metric["name"]: metric["value"] for metric in record["metrics"]}


@pytest.fixture(scope="module")
def llama(torch_converted: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama with its decoder exported from PyTorch."""
    model_dir = tmp_path_factory.mktemp("llama") / "llama"
    shutil.copytree(torch_converted("llama"), model_dir)
    return model_dir


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma3-text"])
def test_a_bare_language_model_converts_to_an_embedding_and_a_decoder_that_generate_as_transformers_does(
    family: str, exported: Callable[[str], Path], tmp_path: Path
) -> None:
    model_dir = tmp_path / family
    shutil.copytree(exported(family), model_dir)

    vlmopt_json("convert", model_dir)

    onnx = manifest(model_dir)["artifacts"]["onnx"]
    assert sorted(onnx["towers"]) == ["decoder", "embedding"]
    assert _metrics(model_dir, "onnx")[GENERATION_IDENTICAL] == 1.0


def test_a_bare_language_model_generates_from_a_prompt_alone_the_tokens_transformers_generates(llama: Path) -> None:
    asked = ("--prompt", "Describe a cat in one sentence.", "--max-new-tokens", 12)

    onnx = vlmopt_json("generate", llama, "onnx", *asked)
    reference = vlmopt_json("generate", llama, "hf", *asked)

    assert onnx["backend"] == "onnxruntime" and reference["backend"] == "transformers"
    assert onnx["images"] == 0 and len(onnx["tokens"]) == 12
    assert onnx["tokens"] == reference["tokens"]


def test_a_bare_language_models_int4_decoder_is_scored_on_tokens(llama: Path, copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(llama)

    vlmopt_json("quantize", model_dir, "--part", "decoder=int4", *GATES_OFF)

    variant = manifest(model_dir)["artifacts"]["decoder-int4"]
    assert variant["record"]["towers"]["embedding"]["quantization"] == {"copied": "unchanged from the parent"}
    metrics = _metrics(model_dir, "decoder-int4")
    assert 0.0 < metrics["teacher-forced next-token top-1 agreement"] <= 1.0
    assert "perplexity increase" in metrics


def test_bench_times_a_bare_language_models_embedding_and_decoder(llama: Path, copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(llama)

    report = vlmopt_json("bench", model_dir, "--batch", "1", "--iterations", "2", "--warmup", "0")

    rows = {(row["artifact"], row["tower"]) for row in report["rows"]}
    assert {("onnx", "embedding"), ("onnx", "decoder"), ("hf", "decoder")} <= rows


def test_generate_refuses_an_image_for_a_bare_language_model(llama: Path) -> None:
    image = next((Path(__file__).resolve().parent.parent / "src" / "vlmopt" / "data" / "images").iterdir())

    result = vlmopt("generate", llama, "onnx", "--prompt", "What is this?", "--image", image)

    assert result.exit_code == 2 and "takes no images" in result.stderr


def test_quantize_refuses_a_vision_part_on_a_bare_language_model(llama: Path) -> None:
    assert_refused(llama, "quantize", "--part", "vision=int8", *GATES_OFF, fragments=("no part named vision", "embedding, decoder"))


def test_demo_model_refuses_a_real_language_model_of_another_type_than_the_family(tmp_path: Path, exported: Callable[[str], Path]) -> None:
    source = tmp_path / "qwen2-src"
    vlmopt_json("demo-model", source, "--family", "qwen2")

    result = vlmopt("demo-model", tmp_path / "out", "--family", "llama", "--language-model", source)

    assert result.exit_code == 2 and "language model 'qwen2' is not supported by --family llama" in result.stderr
    assert not (tmp_path / "out").exists()


def test_convert_refuses_a_language_model_with_a_sliding_window_on_every_layer(demo_source: Callable[[str], Path], tmp_path: Path) -> None:
    source = tmp_path / "mistral-windowed"
    shutil.copytree(demo_source("mistral"), source)
    config = source / "config.json"
    config.write_text(config.read_text().replace('"sliding_window": null', '"sliding_window": 16'))

    result = vlmopt("export", source, "-o", tmp_path / "model")

    assert result.exit_code == 2 and "sliding window of 16 positions" in result.stderr


def test_the_default_int4_method_rounds_a_decoder_on_no_grid_to_nearest(llama: Path, copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(llama)

    vlmopt_json("quantize", model_dir, "--part", "decoder=int4", *GATES_OFF)

    record = manifest(model_dir)["artifacts"]["decoder-int4"]["record"]["towers"]["decoder"]["quantization"]
    assert record["method"] == "rtn"
    assert record["default"].startswith("rtn: 0 of 15 matrices")
