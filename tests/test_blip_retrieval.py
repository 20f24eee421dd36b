"""BLIP image-text retrieval and matching on the tiny demo: three encoder towers (vision -> image_feat + image_embeds,
text -> text_feat, itm -> itm_logits), scored against transformers' `BlipForImageTextRetrieval` with and without its
matching head, quantized per tower, and the checkpoint a user can get wrong."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import assert_bad_input, manifest, vlmopt, vlmopt_json
from generative import export_with_config
from vlmopt.samples import sample_image

TOWERS = ("vision", "text", "itm")


@pytest.fixture(scope="module")
def model(converted: Callable[[str], Path]) -> Path:
    return converted("blip-retrieval")


def _onnx_scores(model_dir: Path, images: list, texts: list[str], folder: str = "onnx") -> tuple[np.ndarray, np.ndarray | None]:
    """(cosine of image i and text j, ITM logits of image i with text i where there are as many texts as images)
    through the exported towers, fed by the checkpoint's own processor."""
    import onnxruntime as ort
    from transformers import BlipProcessor

    processor = BlipProcessor.from_pretrained(model_dir / "hf")
    encoded = processor(images=images, text=texts, return_tensors="np", padding=True)
    ids, mask = encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64)
    session = {t: ort.InferenceSession(str(model_dir / folder / f"{t}.onnx"), providers=["CPUExecutionProvider"]) for t in TOWERS}
    image_feat, image_embeds = session["vision"].run(["image_feat", "image_embeds"], {"pixel_values": encoded["pixel_values"].astype(np.float32)})
    (text_feat,) = session["text"].run(None, {"input_ids": ids, "attention_mask": mask})
    if len(images) != len(texts):
        return image_feat @ text_feat.T, None
    (itm,) = session["itm"].run(None, {"input_ids": ids, "attention_mask": mask, "image_embeds": image_embeds})
    return image_feat @ text_feat.T, itm


def _transformers_scores(model_dir: Path, images: list, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    import torch
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    processor = BlipProcessor.from_pretrained(model_dir / "hf")
    reference = BlipForImageTextRetrieval.from_pretrained(model_dir / "hf").eval()
    encoded = processor(images=images, text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        cosine = reference(**encoded, use_itm_head=False).itm_score
        itm = reference(**encoded, use_itm_head=True).itm_score
    return cosine.numpy(), itm.numpy()


def test_export_reads_a_blip_retrieval_checkpoint_as_the_retrieval_family(exported: Callable[[str], Path]) -> None:
    traits = manifest(exported("blip-retrieval"))["artifacts"]["hf"]["traits"]

    assert traits["family"] == "blip-retrieval" and traits["model_type"] == "blip"


def test_the_captioning_checkpoint_of_the_same_model_type_stays_the_blip_family(exported: Callable[[str], Path]) -> None:
    assert manifest(exported("blip"))["artifacts"]["hf"]["traits"]["family"] == "blip"


def test_convert_writes_three_towers_and_verifies_zero_shot_on_the_built_in_photos(model: Path) -> None:
    artifact = manifest(model)["artifacts"]["onnx"]
    metrics = {m["name"]: m for m in artifact["verification"]["metrics"]}

    assert set(artifact["towers"]) == set(TOWERS)
    assert [o["name"] for o in artifact["towers"]["vision"]["outputs"]] == ["image_feat", "image_embeds"]
    assert artifact["verification"]["passed"]
    assert metrics["zero-shot top-1 agreement"]["value"] == 1.0
    assert "(real)" in metrics["zero-shot top-1 agreement"]["data"]


@pytest.mark.parametrize(
    ("photos", "texts"),
    [
        ([3], ["a cat"]),
        ([0, 4, 7], ["a dog on the grass", "a red car parked by the road at night", "the sea"]),
    ],
)
def test_towers_score_as_transformers_with_and_without_the_itm_head(model: Path, photos: list[int], texts: list[str]) -> None:
    images = [sample_image(i) for i in photos]

    cosine, itm = _onnx_scores(model, images, texts)
    expected_cosine, expected_itm = _transformers_scores(model, images, texts)

    np.testing.assert_allclose(cosine, expected_cosine, atol=1e-5)
    np.testing.assert_allclose(itm, expected_itm, atol=1e-4)
    assert itm.shape == (len(texts), 2) and cosine.shape == (len(photos), len(texts))


def test_feature_towers_give_unit_length_embeddings(model: Path) -> None:
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    vision = ort.InferenceSession(str(model / "onnx" / "vision.onnx"), providers=["CPUExecutionProvider"])
    text = ort.InferenceSession(str(model / "onnx" / "text.onnx"), providers=["CPUExecutionProvider"])
    (image_feat,) = vision.run(["image_feat"], {"pixel_values": rng.standard_normal((2, 3, 32, 32), dtype=np.float32)})
    (text_feat,) = text.run(None, {"input_ids": rng.integers(6, 90, (3, 9)), "attention_mask": np.ones((3, 9), np.int64)})

    np.testing.assert_allclose(np.linalg.norm(image_feat, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(text_feat, axis=1), 1.0, atol=1e-5)


def test_quantize_int8_writes_every_tower_and_keeps_zero_shot_agreement(model: Path, tmp_path: Path) -> None:
    model_dir = Path(shutil.copytree(model, tmp_path / "blip-retrieval"))

    made = vlmopt_json("quantize", model_dir, "--mode", "int8-dynamic", "--min-cosine", "0.99")
    artifact = manifest(model_dir)["artifacts"][made["artifact"]["name"]]
    metrics = {m["name"]: m for m in artifact["verification"]["metrics"]}

    # random weights: every photo's features sit close together, so top-1 agreement is recorded, not gated
    zero_shot = metrics["zero-shot top-1 agreement"]
    assert set(artifact["towers"]) == set(TOWERS) and artifact["verification"]["passed"]
    assert 0 <= zero_shot["value"] <= 1 and "(real)" in zero_shot["data"]
    images, texts = [sample_image(2), sample_image(5)], ["a cat", "a bridge over a river"]
    cosine, itm = _onnx_scores(model_dir, images, texts, folder=made["artifact"]["name"])
    expected_cosine, expected_itm = _onnx_scores(model_dir, images, texts)
    assert np.abs(cosine - expected_cosine).max() < 0.02
    # the ITM logits of random weights are small (|x| < 0.05): held as a whole, within 10 % (4 % measured with VNNI)
    assert np.linalg.norm(itm - expected_itm) < 0.1 * np.linalg.norm(expected_itm)


def test_quantize_one_tower_leaves_the_others_fp32(model: Path, tmp_path: Path) -> None:
    model_dir = Path(shutil.copytree(model, tmp_path / "blip-retrieval"))

    made = vlmopt_json("quantize", model_dir, "--part", "itm=int8-dynamic", "--min-cosine", "0.99")
    name = made["artifact"]["name"]

    for tower in ("vision", "text"):
        assert (model_dir / name / f"{tower}.onnx").read_bytes() == (model_dir / "onnx" / f"{tower}.onnx").read_bytes()
    assert (model_dir / name / "itm.onnx").stat().st_size < (model_dir / "onnx" / "itm.onnx").stat().st_size


# -- bad input -------------------------------------------------------------------------------------
def test_a_retrieval_checkpoint_whose_text_encoder_expects_other_image_rows_is_refused(demo_source: Callable[[str], Path], tmp_path: Path) -> None:
    def wider_rows(config: dict[str, Any]) -> None:
        config["text_config"]["encoder_hidden_size"] = 48

    result, out = export_with_config(demo_source("blip-retrieval"), tmp_path, wider_rows)

    assert_bad_input(result, "encoder_hidden_size", "disagree")
    assert not out.exists()


def test_a_blip_checkpoint_of_another_head_is_refused_with_the_two_it_takes(demo_source: Callable[[str], Path], tmp_path: Path) -> None:
    def question_answering(config: dict[str, Any]) -> None:
        config["architectures"] = ["BlipForQuestionAnswering"]

    result, out = export_with_config(demo_source("blip-retrieval"), tmp_path, question_answering)

    assert_bad_input(result, "BlipForQuestionAnswering", "BlipForConditionalGeneration", "BlipForImageTextRetrieval")
    assert not out.exists()


def test_monolith_is_refused_for_the_retrieval_towers(model: Path, tmp_path: Path) -> None:
    model_dir = Path(shutil.copytree(model, tmp_path / "blip-retrieval"))

    result = vlmopt("convert", model_dir, "--monolith", "--name", "mono")

    assert_bad_input(result, "--monolith")
    assert not (model_dir / "mono").exists()


@pytest.mark.slow
def test_bench_and_serve_take_the_feature_towers_like_a_dual_encoder(model: Path, tmp_path: Path) -> None:
    from serving import Server, call, data_url

    model_dir = Path(shutil.copytree(model, tmp_path / "blip-retrieval"))
    vlmopt_json("bench", model_dir, "--batch", "1,4", "--iterations", 2, "--warmup", 0)
    labels = ["a cat", "a dog on the grass", "a red car"]
    photos = [sample_image(1), sample_image(6)]

    with Server(model_dir, "--max-batch", 4) as server:
        status, body, _ = call(server.url, "/v1/zero-shot", {"images": [data_url(p) for p in photos], "labels": labels})
        assert server.terminate() == 0

    cosine, _ = _onnx_scores(model_dir, photos, labels)
    assert status == 200, body
    np.testing.assert_allclose([row["similarities"] for row in body["data"]], cosine, atol=1e-4)
    assert [row["label"] for row in body["data"]] == [labels[i] for i in np.argmax(cosine, axis=1)]
