"""The bad input of issue 21, against every generative family: an image Pillow refuses to open (over its pixel limit),
images in modes the processors do not take (converted, and said), images too small for a tile, more or fewer images
than the prompt has image markers, a prompt longer than the context, and a checkpoint whose configs disagree with each
other or with the weights. Refused input gets one line on stderr, exit 2, and nothing written."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import assert_bad_input, leftovers, manifest, snapshot, vlmopt
from generative import export_with_config
from vlmopt.samples import sample_image

#: the demo of each generative family (the family's name where the demo is named otherwise)
DEMOS = {
    "llava": "llava",
    "smolvlm": "smolvlm",
    "gemma3": "gemma3",
    "llava_next": "llava_next",
    "llava_onevision": "llava_onevision",
    "qwen2_5_vl": "qwen2_5_vl",
    "blip": "blip",
    "llama": "causal-lm",
}
#: the families that take images
VLMS = [demo for demo, family in DEMOS.items() if family != "causal-lm"]
#: the families whose prompt marks where each image goes (BLIP captions one image per prompt, with no marker)
MARKED = [demo for demo in VLMS if demo != "blip"]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Image files by what is wrong with them; `ok` is an ordinary RGB photo."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("bad-images")
    photo = sample_image(4)
    made = {
        "ok": photo,
        "grayscale": photo.convert("L"),
        "cmyk": photo.convert("CMYK"),
        "16-bit": Image.fromarray(np.asarray(photo.convert("L"), np.uint16) * 257),
        "one-pixel": Image.new("RGB", (1, 1), (200, 30, 30)),
        "sliver": photo.resize((2, 300)),
        # 400 MP, 1 bit a pixel: a few KB on disk, 1.2 GB as RGB
        "huge": Image.new("1", (20000, 20000)),
    }
    paths = {}
    for name, image in made.items():
        paths[name] = folder / (f"{name}.jpg" if name == "cmyk" else f"{name}.png")
        image.save(paths[name])
    return paths


def _model(exported: Callable[[str], Path], demo: str) -> Path:
    return exported(demo)


def _marker(model_dir: Path) -> str:
    """The image marker the family's processor puts where an image goes (`<image>`, `<start_of_image>`, ...)."""
    from vlmopt.families import family_named

    family = family_named(manifest(model_dir)["artifacts"]["hf"]["traits"]["family"])
    return family.preprocessor(model_dir / "hf").image_token


def _refused(model_dir: Path, *args: object, fragments: tuple[str, ...] = ()) -> str:
    before = snapshot(model_dir)

    result = vlmopt("generate", model_dir, *args, "--max-new-tokens", 2)

    assert_bad_input(result, *fragments)
    assert snapshot(model_dir) == before and leftovers(model_dir) == []
    return result.stderr.strip()


def _generated(model_dir: Path, *args: object) -> dict[str, Any]:
    result = vlmopt("generate", model_dir, *args, "--max-new-tokens", 1, "--json")
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.stderr}"
    return json.loads(result.stdout)


def test_every_generative_family_is_covered() -> None:
    from vlmopt.families import generative_families

    assert set(DEMOS.values()) == set(generative_families())


# -- images --------------------------------------------------------------------------------------
@pytest.mark.parametrize("demo", list(DEMOS))
def test_an_image_over_pillows_pixel_limit_is_refused(exported: Callable[[str], Path], images: dict[str, Path], demo: str) -> None:
    _refused(_model(exported, demo), "--image", images["huge"], "--prompt", "Describe it.", fragments=("400000000 pixels", "limit"))


@pytest.mark.parametrize("mode", ["grayscale", "cmyk", "16-bit"])
@pytest.mark.parametrize("demo", VLMS)
def test_an_image_in_another_mode_is_converted_to_rgb_and_said(exported: Callable[[str], Path], images: dict[str, Path], demo: str, mode: str) -> None:
    result = _generated(_model(exported, demo), "--image", images[mode], "--prompt", "Describe it.")

    (note,) = result["image_conversions"]
    assert str(images[mode]) in note and "-> RGB" in note
    assert result["images"] == 1


def test_the_conversion_is_said_on_stderr_without_json(exported: Callable[[str], Path], images: dict[str, Path]) -> None:
    result = vlmopt("generate", _model(exported, "llava"), "--image", images["16-bit"], "--prompt", "Describe it.", "--max-new-tokens", 1)

    assert result.exit_code == 0, result.stderr
    assert "image converted for the model" in result.stderr and "I;16 -> RGB (scaled to 8 bits)" in result.stderr


@pytest.mark.parametrize("shape", ["one-pixel", "sliver"])
@pytest.mark.parametrize("demo", VLMS)
def test_an_image_smaller_than_a_tile_is_resized_by_the_processor(exported: Callable[[str], Path], images: dict[str, Path], demo: str, shape: str) -> None:
    result = _generated(_model(exported, demo), "--image", images[shape], "--prompt", "Describe it.")

    assert result["images"] == 1 and len(result["tokens"]) == 1


# -- images against the prompt -------------------------------------------------------------------
@pytest.mark.parametrize("demo", MARKED)
def test_more_images_than_the_prompt_marks_are_refused(exported: Callable[[str], Path], images: dict[str, Path], demo: str) -> None:
    model_dir = _model(exported, demo)
    marker = _marker(model_dir)

    _refused(model_dir, "--image", images["ok"], "--image", images["ok"], "--prompt", f"{marker} Describe it.", fragments=("2 image(s)", marker))


@pytest.mark.parametrize("demo", MARKED)
def test_fewer_images_than_the_prompt_marks_are_refused(exported: Callable[[str], Path], images: dict[str, Path], demo: str) -> None:
    model_dir = _model(exported, demo)
    marker = _marker(model_dir)

    _refused(model_dir, "--image", images["ok"], "--prompt", f"{marker} {marker} Compare them.", fragments=("1 image(s)", marker))


@pytest.mark.parametrize("demo", MARKED)
def test_a_marked_prompt_without_an_image_is_refused(exported: Callable[[str], Path], demo: str) -> None:
    model_dir = _model(exported, demo)
    marker = _marker(model_dir)

    _refused(model_dir, "--prompt", f"{marker} Describe it.", fragments=("0 image(s)",))


@pytest.mark.parametrize("count", [0, 2])
def test_blip_refuses_anything_but_one_image_per_prompt(exported: Callable[[str], Path], images: dict[str, Path], count: int) -> None:
    _refused(_model(exported, "blip"), *(["--image", images["ok"]] * count), "--prompt", "a picture of", fragments=("one image per prompt",))


def test_a_language_model_alone_refuses_an_image(exported: Callable[[str], Path], images: dict[str, Path]) -> None:
    _refused(_model(exported, "llama"), "--image", images["ok"], "--prompt", "Describe it.", fragments=("image",))


# -- the prompt against the context --------------------------------------------------------------
@pytest.mark.parametrize("demo", list(DEMOS))
def test_a_prompt_longer_than_the_context_is_refused(exported: Callable[[str], Path], images: dict[str, Path], demo: str) -> None:
    image = [] if demo == "llama" else ["--image", images["ok"]]

    line = _refused(_model(exported, demo), *image, "--prompt", "the cat sat on the mat " * 400, fragments=("positions",))

    assert "shorten" in line


# -- checkpoints whose configs disagree ------------------------------------------------------------
@pytest.mark.parametrize("demo", VLMS)
def test_a_vision_hidden_size_the_weights_do_not_have_is_refused(demo_source: Callable[[str], Path], tmp_path: Path, demo: str) -> None:
    def wider(config: dict[str, Any]) -> None:
        config["vision_config"]["hidden_size"] += 16

    result, out = export_with_config(demo_source(demo), tmp_path, wider)

    assert_bad_input(result, "hidden")
    assert not out.exists()


@pytest.mark.parametrize("demo", MARKED)
def test_an_image_token_outside_the_text_vocabulary_is_refused(demo_source: Callable[[str], Path], tmp_path: Path, demo: str) -> None:
    def outside(config: dict[str, Any]) -> None:
        key = next(k for k in ("image_token_id", "image_token_index") if k in config)
        config[key] = 1_000_000

    result, out = export_with_config(demo_source(demo), tmp_path, outside)

    assert_bad_input(result, "1000000", "vocabulary", "disagree")
    assert not out.exists()


def test_a_language_model_whose_hidden_size_the_weights_do_not_have_is_refused(demo_source: Callable[[str], Path], tmp_path: Path) -> None:
    def wider(config: dict[str, Any]) -> None:
        config["hidden_size"] += 16

    result, out = export_with_config(demo_source("llama"), tmp_path, wider)

    assert_bad_input(result, "do not fit its config", "stored")
    assert not out.exists()
