"""LLaVA-style models end to end on the tiny demo: three parts with a KV cache, verified generation, per-part quantization."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import manifest, vlmopt, vlmopt_json
from vlmopt import graph
from vlmopt.samples import sample_image


@pytest.fixture(scope="module")
def llava(converted: Callable[[str], Path]) -> Path:
    """The tiny llava as `convert` makes it by default: its decoder from onnxruntime-genai's model builder."""
    return converted("llava")


@pytest.fixture(scope="module")
def llava_torch(tmp_path_factory: pytest.TempPathFactory, exported: Callable[[str], Path]) -> Path:
    """The tiny llava with its decoder exported from PyTorch (`--decoder torch`)."""
    model_dir = tmp_path_factory.mktemp("llava-torch") / "llava"
    shutil.copytree(exported("llava"), model_dir)
    vlmopt_json("convert", model_dir, "--decoder", "torch")
    return model_dir


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images") / "picture.png"
    sample_image(1).save(path)
    return path


def _variant(tmp_path_factory: pytest.TempPathFactory, llava: Path, *flags: str) -> Path:
    """A copy of the tiny llava with one `quantize --part` variant, made with the token gates off (random weights)."""
    model_dir = tmp_path_factory.mktemp("llava-variant") / "llava"
    shutil.copytree(llava, model_dir)
    vlmopt_json("quantize", model_dir, *flags, "--min-token-agreement", "off", "--max-ppl-increase", "off")
    return model_dir


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory, llava: Path) -> Path:
    """The tiny llava with a weight-only int8 decoder, int8 vision and int8 embedding table."""
    return _variant(tmp_path_factory, llava, "--part", "decoder=int8", "--part", "vision=int8", "--part", "embedding=int8")


PREFILLED = "decoder-int4_vision-int8_prefill-int8-dynamic"


@pytest.fixture(scope="module")
def prefilled(tmp_path_factory: pytest.TempPathFactory, llava: Path) -> Path:
    """The tiny llava with an int4 decoder and an int8-dynamic prompt decoder beside it (`--prefill`)."""
    return _variant(tmp_path_factory, llava, "--part", "decoder=int4", "--part", "vision=int8", "--prefill", "int8-dynamic")


def _axes(path: Path) -> dict[str, list[Any]]:
    model = onnx.load(str(path), load_external_data=False)
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in (*model.graph.input, *model.graph.output)}


def _decoder_feed(session: Any, batch: int, sequence: int) -> dict[str, np.ndarray]:
    """A prefill feed for any decoder's contract: random embeddings, a full mask, empty pasts."""
    inputs = {i.name: i for i in session.get_inputs()}
    past = inputs[next(n for n in inputs if n.startswith("past_key_values."))].shape
    feed = {
        "inputs_embeds": np.random.default_rng(0).standard_normal((batch, sequence, inputs["inputs_embeds"].shape[2])).astype(np.float32),
        "attention_mask": np.ones((batch, sequence), np.int64),
    }
    feed.update({n: np.zeros((batch, past[1], 0, past[3]), np.float32) for n in inputs if n.startswith("past_key_values.")})
    if "position_ids" in inputs:
        feed["position_ids"] = np.tile(np.arange(sequence), (batch, 1))
    return feed


def _generate(model_dir: Path, image: Path, *args: object) -> dict[str, Any]:
    return vlmopt_json("generate", model_dir, *args, "--image", image, "--prompt", "Describe this image.", "--max-new-tokens", 12)


# -- convert ---------------------------------------------------------------------------------------
def test_convert_writes_vision_embedding_and_decoder_parts_with_named_axes(llava: Path) -> None:
    folder = llava / "onnx"
    vision, embedding, decoder = (_axes(folder / f"{part}.onnx") for part in ("vision", "embedding", "decoder"))

    assert vision["pixel_values"][0] == "num_images"
    assert vision["image_features"][0] == "num_image_tokens"
    assert embedding["input_ids"] == ["batch", "sequence"]
    assert embedding["inputs_embeds"][:2] == ["batch", "sequence"]
    assert decoder["attention_mask"] == ["batch", "total_sequence"]
    assert decoder["past_key_values.0.key"] == ["batch", 2, "past_sequence", 16]  # the tiny demo: 2 key/value heads of 16
    assert decoder["present.1.value"] == ["batch", 2, "total_sequence", 16]
    assert decoder["logits"][:2] == ["batch", "sequence"]


def test_the_default_decoder_comes_from_onnxruntime_genais_builder_with_grouped_query_attention(llava: Path) -> None:
    decoder = onnx.load(str(llava / "onnx" / "decoder.onnx"), load_external_data=False)
    record = manifest(llava)["artifacts"]["onnx"]["record"]

    assert {n.op_type for n in decoder.graph.node} >= {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"}
    assert "position_ids" not in {i.name for i in decoder.graph.input}  # rotary positions inside the operator
    assert record["decoder"] == "builder"
    assert record["towers"]["decoder"]["maker"] == "onnxruntime-genai model builder" and record["towers"]["decoder"]["version"]
    assert record["towers"]["decoder"]["past_present_share_buffer"] is True
    assert not (llava / "onnx" / ".builder").exists() and (llava / "onnx" / "decoder.onnx.data").is_file()


def test_the_builders_decoder_shares_one_cache_buffer_in_genai_config(llava: Path) -> None:
    config = json.loads((llava / "onnx" / "genai_config.json").read_text())

    assert config["search"]["past_present_share_buffer"] is True
    assert "position_ids" not in config["model"]["decoder"]["inputs"]


def test_decoder_torch_exports_the_decoder_from_pytorch_with_positions_and_named_axes(llava_torch: Path) -> None:
    decoder = _axes(llava_torch / "onnx" / "decoder.onnx")
    graph_ops = {n.op_type for n in onnx.load(str(llava_torch / "onnx" / "decoder.onnx"), load_external_data=False).graph.node}

    assert decoder["attention_mask"] == ["batch", "total_sequence"]
    assert decoder["position_ids"] == ["batch", "sequence"]
    assert decoder["past_key_values.0.key"][0::2] == ["batch", "past_sequence"]
    assert decoder["present.1.value"][0::2] == ["batch", "total_sequence"]
    assert "GroupQueryAttention" not in graph_ops
    assert manifest(llava_torch)["artifacts"]["onnx"]["record"]["decoder"] == "torch"


def test_convert_writes_a_genai_config_and_the_processor_beside_the_parts(llava: Path) -> None:
    folder = llava / "onnx"
    config = json.loads((folder / "genai_config.json").read_text())

    assert config["model"]["type"] == "phi3v"
    assert {config["model"][part]["filename"] for part in ("vision", "embedding", "decoder")} == {"vision.onnx", "embedding.onnx", "decoder.onnx"}
    assert config["model"]["decoder"]["num_hidden_layers"] == 2
    assert (folder / "tokenizer.json").is_file() and (folder / "processor_config.json").is_file()


def _decoder_check(model_dir: Path) -> dict[str, Any]:
    verification = manifest(model_dir)["artifacts"]["onnx"]["verification"]
    assert verification["passed"]
    return next(check for check in verification["towers"]["decoder"] if check["data"] == "transformers")


def test_convert_checks_the_decoder_against_transformers_at_two_lengths_both_batches_and_decode_steps(llava_torch: Path) -> None:
    decoder = _decoder_check(llava_torch)

    assert decoder["feeds"] == 12  # 2 prompt lengths x 2 batches x (prefill + 2 decode steps)
    assert decoder["outputs"]["logits"]["max_abs_diff"] < 1e-4


def test_convert_checks_the_builders_decoder_on_left_padded_batches_and_decode_steps(llava: Path) -> None:
    decoder = _decoder_check(llava)

    # 2 prompt lengths x (batch 1: prefill + steps of 1 and 3; batch 2, left-padded: prefill + a step of 1)
    assert decoder["feeds"] == 10 and "GroupQueryAttention" in decoder["source"]
    assert decoder["outputs"]["logits"]["max_abs_diff"] < 1e-4
    assert decoder["outputs"]["present.0.key"]["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("maker", ["builder", "torch"])
def test_convert_requires_greedy_generation_identical_to_transformers_generate(maker: str, request: pytest.FixtureRequest) -> None:
    model_dir = request.getfixturevalue("llava" if maker == "builder" else "llava_torch")
    metrics = {m["name"]: m for m in manifest(model_dir)["artifacts"]["onnx"]["verification"]["metrics"]}
    greedy = metrics["greedy generation identical to transformers"]

    assert greedy["threshold"] == 1.0 and greedy["value"] == 1.0
    assert greedy["detail"]["pairs"] >= 3 and greedy["detail"]["new_tokens"] >= 32
    assert metrics["onnxruntime-genai generation identical to transformers"]["value"] == 1.0


@pytest.mark.parametrize("maker", ["builder", "torch"])
def test_a_left_padded_batch_of_two_prompts_generates_what_transformers_generates(maker: str, request: pytest.FixtureRequest) -> None:
    from vlmopt.families.llava import LlavaPreprocessor
    from vlmopt.runners.generate import GenerateRequest, HfGenerateRunner, OrtGenerateRunner

    model_dir = request.getfixturevalue("llava" if maker == "builder" else "llava_torch")
    preprocessor = LlavaPreprocessor(model_dir / "hf")
    prompt = preprocessor(["Describe this image.", "What is in this picture, and what colour is it?"], [sample_image(4), sample_image(5)])
    assert (prompt.attention_mask == 0).any()  # the shorter prompt is padded
    request_ = GenerateRequest(prompt, 16, preprocessor.eos_token_ids, preprocessor.pad_token_id, min_new_tokens=16)
    parts = {"vision": "vision.onnx", "embedding": "embedding.onnx", "decoder": "decoder.onnx"}

    with HfGenerateRunner(model_dir / "hf", threads=1) as hf, OrtGenerateRunner(model_dir / "onnx", parts, threads=1) as ort:
        expected, got = hf.generate(request_).tokens, ort.generate(request_).tokens

    assert got == expected and len(got) == 2


@pytest.mark.parametrize("maker", ["builder", "torch"])
def test_the_decoder_computes_only_the_last_positions_logits_when_asked(maker: str, request: pytest.FixtureRequest) -> None:
    model_dir = request.getfixturevalue({"builder": "llava", "torch": "llava_torch"}[maker])
    session = ort.InferenceSession(str(model_dir / "onnx" / "decoder.onnx"), providers=["CPUExecutionProvider"])
    feed = _decoder_feed(session, batch=2, sequence=6)

    every = session.run(["logits"], feed)[0]  # logits_to_keep left at its default, 0: what onnxruntime-genai gets
    last = session.run(["logits"], {**feed, "logits_to_keep": np.array(1, np.int64)})[0]

    assert every.shape[1] == 6 and last.shape[1] == 1
    np.testing.assert_allclose(last[:, 0], every[:, -1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("maker", ["builder", "torch"])
def test_the_loop_asks_the_converted_decoder_for_the_last_positions_logits_only(maker: str, request: pytest.FixtureRequest) -> None:
    from vlmopt.runners.generate import OrtParts

    model_dir = request.getfixturevalue({"builder": "llava", "torch": "llava_torch"}[maker])
    parts = OrtParts(model_dir / "onnx", {"embedding": "embedding.onnx", "decoder": "decoder.onnx"}, threads=1)

    # the graph gives logits_to_keep a default, which ONNX Runtime would list as an overridable initializer, unbindable
    assert parts.keeps_logits and "logits_to_keep" in {i.name for i in parts.decoder.get_inputs()}


def test_a_prefill_hands_back_each_rows_last_logits_from_a_batch_of_unequal_prompts(llava: Path) -> None:
    from vlmopt.runners.generate import OrtParts

    parts = OrtParts(llava / "onnx", {"embedding": "embedding.onnx", "decoder": "decoder.onnx"}, threads=1)
    embeds = np.random.default_rng(1).standard_normal((2, 9, parts.hidden)).astype(np.float32)
    mask = np.ones((2, 9), np.int64)
    mask[1, :4] = 0  # the second prompt is 5 positions long, left-padded

    every = parts.cache(2, 12).prefill(embeds, mask)
    last = parts.cache(2, 12).prefill_last(embeds, mask)

    np.testing.assert_allclose(last, every[:, -1], rtol=0, atol=1e-5)


def _int8_decoder(quantized: Path) -> Path:
    record = manifest(quantized)["artifacts"]["decoder-int8_vision-int8_embedding-int8"]
    return quantized / "decoder-int8_vision-int8_embedding-int8" / record["towers"]["decoder"]["file"]


def test_a_prefill_decoder_takes_the_prompt_and_the_decoder_takes_the_steps(llava: Path, quantized: Path) -> None:
    from vlmopt.runners.generate import OrtParts

    files = {"embedding": "embedding.onnx", "decoder": "decoder.onnx"}
    int8_alone = OrtParts(llava / "onnx", {**files, "decoder": str(_int8_decoder(quantized))}, threads=1)
    fp32_alone = OrtParts(llava / "onnx", files, threads=1)
    split = OrtParts(llava / "onnx", {**files, "decoder_prefill": str(_int8_decoder(quantized))}, threads=1)
    embeds = np.random.default_rng(2).standard_normal((1, 9, split.hidden)).astype(np.float32)
    step = np.random.default_rng(3).standard_normal((1, 1, split.hidden)).astype(np.float32)
    mask = np.ones((1, 9), np.int64)
    caches = {name: parts.cache(1, 12) for name, parts in (("int8", int8_alone), ("fp32", fp32_alone), ("split", split))}
    first = {name: cache.prefill_last(embeds, mask) for name, cache in caches.items()}
    then = {name: cache.step(step)[:, -1] for name, cache in caches.items()}

    np.testing.assert_allclose(first["split"], first["int8"], rtol=0, atol=1e-5)
    assert np.abs(first["split"] - first["fp32"]).max() > 1e-4  # the two decoders do differ on this prompt
    # the step runs the fp32 decoder on the int8 prompt's cache: nearer fp32 alone than int8 alone is
    assert np.abs(then["split"] - then["fp32"]).max() < np.abs(then["int8"] - then["fp32"]).max()


def test_a_prefill_decoder_that_does_not_match_the_decoder_is_refused(llava: Path) -> None:
    from vlmopt.errors import VlmoptError
    from vlmopt.runners.generate import OrtParts

    with pytest.raises(VlmoptError, match="prefill decoder must share"):
        OrtParts(llava / "onnx", {"embedding": "embedding.onnx", "decoder": "decoder.onnx", "decoder_prefill": "vision.onnx"}, threads=1)


def test_prefill_adds_an_int8_dynamic_prompt_decoder_beside_the_int4_decoder(prefilled: Path) -> None:
    artifact = manifest(prefilled)["artifacts"][PREFILLED]
    decoder = artifact["towers"]["decoder"]
    folder = prefilled / PREFILLED
    ops = {name: graph.op_counts(graph.load_structure(folder / name)) for name in (decoder["file"], decoder["prefill"])}

    assert decoder["prefill"] == "decoder_prefill.onnx"
    assert ops["decoder.onnx"].get("MatMulNBits", 0) > 0 and not ops["decoder.onnx"].get("MatMulInteger")
    assert ops["decoder_prefill.onnx"].get("MatMulInteger", 0) > 0 and not ops["decoder_prefill.onnx"].get("MatMulNBits")
    assert artifact["record"]["towers"]["decoder"]["prefill"]["mode"] == "int8-dynamic"
    assert artifact["traits"]["precision"] == "decoder=int4,vision=int8,prefill=int8-dynamic"


def test_the_prompt_decoders_activations_are_quantized_per_token(prefilled: Path) -> None:
    quantization = manifest(prefilled)["artifacts"][PREFILLED]["record"]["towers"]["decoder"]["prefill"]["quantization"]
    ops = graph.op_counts(graph.load_structure(prefilled / PREFILLED / "decoder_prefill.onnx"))

    assert "per token" in quantization["activations"]
    assert not ops.get("DynamicQuantizeLinear") and ops.get("ReduceMax", 0) > 0


def test_the_prompt_decoders_outlier_channels_are_chosen_on_text_the_gate_does_not_read(prefilled: Path) -> None:
    quantization = manifest(prefilled)["artifacts"][PREFILLED]["record"]["towers"]["decoder"]["prefill"]["quantization"]

    assert quantization["calibration"]["windows"] > 0 and "the gate reads only its start" in quantization["calibration"]["source"]
    assert quantization["outlier_channels"]["data"] == quantization["calibration"]["source"]


def test_calib_text_chooses_the_prompt_decoders_outlier_channels(llava: Path, copy_model_dir: Callable[[Path], Path], tmp_path: Path) -> None:
    model_dir = copy_model_dir(llava)
    text = tmp_path / "calibration.txt"
    text.write_text(" ".join(f"Sentence {i} of the user's own calibration text, about cats and maps." for i in range(200)))

    result = vlmopt_json(
        "quantize",
        model_dir,
        "--part",
        "decoder=int4",
        "--prefill",
        "int8-dynamic",
        "--calib-text",
        text,
        "--min-token-agreement",
        "off",
        "--max-ppl-increase",
        "off",
    )

    quantization = manifest(model_dir)["artifacts"][result["artifact"]["name"]]["record"]["towers"]["decoder"]["prefill"]["quantization"]
    assert quantization["calibration"]["source"] == f"your text {text}"


def test_the_prompt_decoder_belongs_to_the_decoder_parts_files(prefilled: Path) -> None:
    from vlmopt.workspace import ModelDir

    artifact = ModelDir.open(prefilled).artifact(PREFILLED)

    assert "decoder_prefill.onnx" in {f.path for f in artifact.tower_files("decoder")}
    assert "decoder_prefill.onnx" not in {f.path for f in artifact.tower_files("vision")}


def test_the_loop_of_a_prefill_artifact_runs_its_prompts_through_the_prompt_decoder(prefilled: Path) -> None:
    from vlmopt.generation import Generator
    from vlmopt.runners.generate import OrtParts

    alone = OrtParts(prefilled / PREFILLED, {"embedding": "embedding.onnx", "decoder": "decoder_prefill.onnx"}, threads=1)
    embeds = np.random.default_rng(4).standard_normal((1, 7, alone.hidden)).astype(np.float32)
    mask = np.ones((1, 7), np.int64)
    with Generator(prefilled, PREFILLED, "onnxruntime", threads=1) as generator:
        parts = generator.load().runner.parts
        prompt, steps = parts.decode(embeds, mask, prompt=True), parts.decode(embeds, mask)

    np.testing.assert_allclose(prompt, alone.decode(embeds, mask), rtol=0, atol=1e-6)
    assert np.abs(steps - prompt).max() > 1e-4  # the int4 decoder is another graph


def test_the_prompt_decoder_is_gated_on_its_own_teacher_forced_figures(prefilled: Path) -> None:
    metrics = {m["name"]: m for m in manifest(prefilled)["artifacts"][PREFILLED]["verification"]["metrics"]}
    decoder, prompt = metrics["teacher-forced next-token top-1 agreement"], metrics["prompt decoder: teacher-forced next-token top-1 agreement"]

    assert prompt["detail"]["graph"] == "prompt" and prompt["detail"]["positions"] == decoder["detail"]["positions"]
    assert prompt["value"] != decoder["value"]  # int8-dynamic and int4 disagree with fp32 at different positions
    assert "prompt decoder: perplexity increase" in metrics


def test_teacher_forcing_with_prompt_scores_the_prompt_decoder(llava: Path, prefilled: Path) -> None:
    from vlmopt.runners.generate import OrtParts
    from vlmopt.verification.generation import teacher_forced

    files = {"embedding": "embedding.onnx", "decoder": "decoder.onnx"}
    folder = prefilled / PREFILLED
    reference = OrtParts(llava / "onnx", files, threads=1)
    split = OrtParts(folder, {**files, "decoder_prefill": "decoder_prefill.onnx"}, threads=1)
    alone = OrtParts(folder, {**files, "decoder": "decoder_prefill.onnx"}, threads=1)
    ids = np.random.default_rng(0).integers(5, 400, 96)

    assert teacher_forced(reference, split, ids, 32, prompt=True) == teacher_forced(reference, alone, ids, 32)
    assert teacher_forced(reference, split, ids, 32) != teacher_forced(reference, alone, ids, 32)


def test_generate_runs_a_prefill_artifact(prefilled: Path, image: Path) -> None:
    result = _generate(prefilled, image, PREFILLED)

    assert result["backend"] == "onnxruntime" and len(result["tokens"]) >= 1


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--mode", "int8-dynamic", "--prefill", "int8-dynamic"], "--prefill adds a prompt decoder"),
        (["--part", "vision=int8", "--prefill", "int8-dynamic"], "--prefill goes beside a decoder part"),
        (["--part", "decoder=int8", "--prefill", "int8-weights"], "is the decoder part's own form"),
        (["--part", "decoder=int4", "--prefill", "int8-dynamic", "--fallback"], "cannot mend a prompt decoder"),
        (["--part", "decoder=int4", "--prefill", "int8-weights", "--calib-text", "README.md"], "reads no calibration data"),
    ],
)
def test_a_prefill_without_a_low_bit_decoder_to_go_beside_is_refused(
    llava: Path, copy_model_dir: Callable[[Path], Path], flags: list[str], message: str
) -> None:
    model_dir = copy_model_dir(llava)

    result = vlmopt("quantize", model_dir, *flags)

    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert set(manifest(model_dir)["artifacts"]) == {"hf", "onnx"}


def test_convert_records_the_export_peak_memory_against_the_weights(llava: Path) -> None:
    memory = manifest(llava)["artifacts"]["onnx"]["record"]["export_memory"]

    assert memory["process_peak_rss_mb"] > 0 and memory["fp32_weights_mb"] > 0
    assert memory["ratio"] == pytest.approx(memory["process_peak_rss_mb"] / memory["fp32_weights_mb"], rel=0.05)


def test_a_config_naming_image_token_id_instead_of_image_token_index_is_read(demo_source: Callable[[str], Path]) -> None:
    from transformers import AutoConfig

    from vlmopt.families.llava import image_token_id

    config = json.loads((demo_source("llava") / "config.json").read_text())
    value = config.get("image_token_index", config.get("image_token_id"))

    assert image_token_id(AutoConfig.for_model(**config)) == value
    assert image_token_id(type("Config", (), {"image_token_id": value})()) == value
    assert image_token_id(type("Config", (), {"image_token_index": value})()) == value


# -- generate --------------------------------------------------------------------------------------
def test_generate_from_hf_and_from_onnx_gives_the_same_greedy_tokens(llava: Path, image: Path) -> None:
    hf, onnx_run = _generate(llava, image, "hf"), _generate(llava, image, "onnx")

    assert hf["backend"] == "transformers" and onnx_run["backend"] == "onnxruntime"
    assert hf["tokens"] == onnx_run["tokens"] and len(hf["tokens"]) >= 1
    assert hf["text"] == onnx_run["text"]


def test_generate_under_onnxruntime_genai_gives_the_same_greedy_tokens(llava: Path, image: Path) -> None:
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is an optional runtime (pip install onnxruntime-genai)")
    genai, onnx_run = _generate(llava, image, "onnx", "--backend", "onnxruntime-genai"), _generate(llava, image, "onnx")

    assert genai["backend"] == "onnxruntime-genai"
    assert genai["tokens"] == onnx_run["tokens"]


def test_generate_json_reports_tokens_text_time_to_first_token_and_rate(llava: Path, image: Path) -> None:
    result = vlmopt_json("generate", llava, "--image", image, "--prompt", "Tell me a story.", "--max-new-tokens", 8, "--temperature", "1.5", "--seed", 3)

    assert 1 <= len(result["tokens"]) <= 8 and isinstance(result["text"], str)
    assert result["timings"]["ttft_s"] > 0
    assert result["finish_reason"] in ("eos", "length")
    assert result["prompt_tokens"] > 16  # the image's 16 tokens and the chat template


def test_generate_streams_the_text_to_stdout(llava: Path, image: Path) -> None:
    expected = _generate(llava, image, "onnx")["text"]

    result = vlmopt("generate", llava, "onnx", "--image", image, "--prompt", "Describe this image.", "--max-new-tokens", 12)

    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == expected.strip()
    assert "first token" in result.stderr


def test_sampling_with_a_seed_repeats_and_another_seed_differs(llava: Path, image: Path) -> None:
    def sample(seed: int) -> list[int]:
        run = vlmopt_json("generate", llava, "--image", image, "--prompt", "Describe this image.", "--max-new-tokens", 16, "--temperature", "5", "--seed", seed)
        return run["tokens"]

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_generate_runs_a_quantized_variant(quantized: Path, image: Path) -> None:
    result = _generate(quantized, image, "decoder-int8_vision-int8_embedding-int8")

    assert result["backend"] == "onnxruntime" and len(result["tokens"]) >= 1


# -- quantize --------------------------------------------------------------------------------------
def test_part_modes_quantize_each_part_with_its_own_operator(quantized: Path) -> None:
    artifact = manifest(quantized)["artifacts"]["decoder-int8_vision-int8_embedding-int8"]
    ops = {name: work["op_counts"] for name, work in artifact["record"]["towers"].items()}
    folder = quantized / artifact["name"]
    decoder = onnx.load(str(folder / "decoder.onnx"), load_external_data=False)
    embedding = onnx.load(str(folder / "embedding.onnx"), load_external_data=False)

    assert artifact["parent"] == "onnx"
    weights = {t.name for t in decoder.graph.initializer}
    assert ops["decoder"].get("MatMulNBits", 0) > 0
    assert not [n.name for n in decoder.graph.node if n.op_type == "MatMul" and weights & set(n.input)]  # only attention's MatMuls stay
    assert {a.i for n in decoder.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"} == {8}
    assert ops["vision"].get("MatMulInteger", 0) + ops["vision"].get("DynamicQuantizeMatMul", 0) > 0
    assert {a.i for n in embedding.graph.node if n.op_type == "GatherBlockQuantized" for a in n.attribute if a.name == "bits"} == {8}
    assert (folder / "genai_config.json").is_file()


def test_a_quantized_variant_records_agreement_kl_perplexity_and_greedy_matches_on_real_text(quantized: Path) -> None:
    verification = manifest(quantized)["artifacts"]["decoder-int8_vision-int8_embedding-int8"]["verification"]
    metrics = {m["name"]: m for m in verification["metrics"]}
    agreement = metrics["teacher-forced next-token top-1 agreement"]

    assert 0 <= agreement["value"] <= 1 and agreement["detail"]["positions"] > 200
    assert "pydoc_data/topics.py" in agreement["detail"]["text"]["source"]
    assert agreement["detail"]["ppl_reference"] > 1 and agreement["detail"]["ppl_candidate"] > 1
    assert metrics["mean KL divergence (fp32 || variant), nats"]["value"] >= 0
    greedy = metrics["greedy exact-match rate"]["detail"]
    assert len(greedy["first_divergence"]) == greedy["pairs"] >= 3


def test_the_token_agreement_gate_fails_the_variant_and_writes_nothing(llava: Path, copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(llava)

    result = vlmopt("quantize", model_dir, "--part", "decoder=int4", "--min-token-agreement", "0.9999", "--max-ppl-increase", "off")

    assert result.exit_code == 1, result.output
    assert "--min-token-agreement" in result.stderr
    assert set(manifest(model_dir)["artifacts"]) == {"hf", "onnx"}
    assert not (model_dir / "decoder-int4").exists()


def test_the_perplexity_gate_fails_the_variant(llava: Path, copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(llava)

    result = vlmopt("quantize", model_dir, "--part", "decoder=int4", "--min-token-agreement", "off", "--max-ppl-increase", "0")

    assert result.exit_code == 1, result.output
    assert "--max-ppl-increase" in result.stderr


def test_teacher_forced_scores_of_a_decoder_against_itself_are_perfect(llava: Path) -> None:
    from vlmopt.runners.generate import OrtParts
    from vlmopt.verification.generation import teacher_forced

    parts = OrtParts(llava / "onnx", {"vision": "vision.onnx", "embedding": "embedding.onnx", "decoder": "decoder.onnx"}, threads=1)
    ids = np.random.default_rng(0).integers(5, 400, 64)

    scores = teacher_forced(parts, parts, ids, 32)

    assert scores["top1_agreement"] == 1.0 and scores["ppl_increase"] == 0.0 and abs(scores["mean_kl"]) < 1e-9


def test_a_part_mode_that_quantizes_nothing_fails_instead_of_passing_the_fp32_part_off(llava: Path, copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(llava)  # the tiny table's rows (64) do not split into blocks of 128, so no Gather is quantized

    result = vlmopt("quantize", model_dir, "--part", "embedding=int8", "--block-size", "128", "--min-token-agreement", "off", "--max-ppl-increase", "off")

    assert result.exit_code == 1, result.output
    assert "quantized no Gather" in result.stderr
    assert set(manifest(model_dir)["artifacts"]) == {"hf", "onnx"}


# -- the builder across the language models the family takes -------------------------------------
TINY_LANGUAGE_MODELS = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),  # q/k/v biases
    "mistral": ("MistralConfig", "MistralForCausalLM"),
}


@pytest.mark.parametrize("model_type", sorted(TINY_LANGUAGE_MODELS))
def test_the_builder_makes_and_convert_verifies_the_decoder_of_another_language_model(
    model_type: str, demo_source: Callable[[str], Path], tmp_path: Path
) -> None:
    import torch
    import transformers
    from transformers import AutoTokenizer

    config_class, model_class = (getattr(transformers, name) for name in TINY_LANGUAGE_MODELS[model_type])
    tokenizer = AutoTokenizer.from_pretrained(str(demo_source("llava")))
    config = config_class(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model_class(config).save_pretrained(str(tmp_path / "lm"))
    tokenizer.save_pretrained(str(tmp_path / "lm"))
    built = vlmopt("demo-model", tmp_path / "src", "--family", "llava", "--size", "tiny", "--language-model", tmp_path / "lm")
    assert built.exit_code == 0, built.stderr
    vlmopt_json("export", tmp_path / "src", "-o", tmp_path / "model")

    converted = vlmopt_json("convert", tmp_path / "model")

    record, verification = converted["artifact"]["record"], converted["artifact"]["verification"]
    assert record["decoder"] == "builder" and record["towers"]["decoder"]["fused_operators"]["GroupQueryAttention"] == 2
    assert verification["passed"]
    metrics = {m["name"]: m["value"] for m in verification["metrics"]}
    assert metrics["greedy generation identical to transformers"] == 1.0


def test_the_conversion_checks_take_the_model_and_keep_no_reference_to_it(llava: Path) -> None:
    import gc
    import weakref

    from vlmopt.families.llava import LlavaPreprocessor
    from vlmopt.hf import load_model
    from vlmopt.verification.generation import conversion_checks
    from vlmopt.workspace import ModelDir

    model = load_model(llava / "hf", attn_implementation="eager")
    alive = weakref.ref(model)
    holder = {"model": model}
    del model
    towers = ModelDir.open(llava).artifact("onnx").towers

    checks, metrics = conversion_checks(holder, LlavaPreprocessor(llava / "hf"), llava / "onnx", towers, 1, lambda line: None)

    gc.collect()
    assert holder == {} and alive() is None  # no reference kept anywhere: its memory can go before the parts load
    assert set(checks) == {"vision", "embedding", "decoder"} and metrics[0].value == 1.0
