"""`vlmopt demo-model`: an offline Hugging Face folder with a real architecture and random weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import assert_bad_input, vlmopt


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("demo") / "clip"
    result = vlmopt("demo-model", folder, "--family", "clip", "--size", "tiny")
    assert result.exit_code == 0, result.stderr
    return folder


def test_demo_clip_folder_loads_as_a_clip_model(clip_folder: Path) -> None:
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(clip_folder)

    assert model.config.model_type == "clip"
    assert (clip_folder / "model.safetensors").is_file()


def test_demo_clip_tokenizer_wraps_text_in_the_configs_bos_and_eos(clip_folder: Path) -> None:
    from transformers import AutoTokenizer

    text_config = json.loads((clip_folder / "config.json").read_text())["text_config"]
    ids = AutoTokenizer.from_pretrained(clip_folder)("a photo of a cat").input_ids

    assert len(ids) > 2
    assert ids[0] == text_config["bos_token_id"]
    assert ids[-1] == text_config["eos_token_id"]


def test_demo_clip_image_processor_makes_pixel_values_of_the_models_image_size(clip_folder: Path) -> None:
    from transformers import AutoImageProcessor

    vision_config = json.loads((clip_folder / "config.json").read_text())["vision_config"]
    size = vision_config["image_size"]
    image = Image.fromarray(np.zeros((50, 40, 3), dtype=np.uint8))

    pixel_values = AutoImageProcessor.from_pretrained(clip_folder)(image, return_tensors="np")["pixel_values"]

    assert pixel_values.shape == (1, 3, size, size)


def test_demo_model_refuses_a_non_empty_target_directory(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")

    result = vlmopt("demo-model", target, "--family", "clip")

    assert_bad_input(result, str(target))
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
