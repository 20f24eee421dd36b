"""Input a user can get wrong with generative models: exit 2, one line on stderr, nothing written."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import assert_bad_input, leftovers, snapshot, vlmopt
from vlmopt.samples import sample_image


@pytest.fixture(scope="module")
def llava(converted: Callable[[str], Path]) -> Path:
    return converted("llava")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bad-images") / "picture.png"
    sample_image(2).save(path)
    return path


def _refused(model_dir: Path, *args: object, fragments: tuple[str, ...] = ()) -> None:
    before = snapshot(model_dir)

    result = vlmopt(*args)

    assert_bad_input(result, *fragments)
    assert snapshot(model_dir) == before
    assert leftovers(model_dir) == []


def test_an_image_with_a_raw_prompt_that_has_no_image_token_is_refused(llava: Path, image: Path) -> None:
    _refused(llava, "generate", llava, "--image", image, "--prompt", "Describe it.", "--raw-prompt", fragments=("no <image> marker",))


def test_an_image_token_without_an_image_is_refused(llava: Path) -> None:
    _refused(llava, "generate", llava, "--prompt", "<image> Describe it.", fragments=("0 image(s)",))


def test_more_images_than_the_prompt_has_image_tokens_for_is_refused(llava: Path, image: Path) -> None:
    _refused(llava, "generate", llava, "--image", image, "--image", image, "--prompt", "<image> Describe it.", fragments=("2 image(s)",))


def test_a_prompt_plus_new_tokens_beyond_the_models_positions_is_refused(llava: Path, image: Path) -> None:
    _refused(llava, "generate", llava, "--image", image, "--prompt", "Describe it.", "--max-new-tokens", 250, fragments=("256 positions",))


def test_zero_new_tokens_is_refused(llava: Path, image: Path) -> None:
    _refused(llava, "generate", llava, "--image", image, "--prompt", "Describe it.", "--max-new-tokens", 0, fragments=("--max-new-tokens",))


def test_a_corrupt_decoder_part_is_refused(llava: Path, image: Path, copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(llava)
    (model_dir / "onnx" / "decoder.onnx").write_bytes(b"not an onnx graph")

    _refused(model_dir, "generate", model_dir, "onnx", "--image", image, "--prompt", "Describe it.", fragments=("decoder.onnx",))


def test_a_missing_decoder_part_is_refused(llava: Path, image: Path, copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(llava)
    (model_dir / "onnx" / "decoder.onnx").unlink()

    _refused(model_dir, "generate", model_dir, "onnx", "--image", image, "--prompt", "Describe it.", fragments=("decoder.onnx",))


def test_generate_on_an_encoder_only_model_is_refused(converted: Callable[[str], Path], image: Path) -> None:
    clip = converted("clip")

    _refused(clip, "generate", clip, "--image", image, "--prompt", "Describe it.", fragments=("encoder", "llava"))


def test_a_language_model_the_family_does_not_support_is_refused_with_the_supported_list(demo_source: Callable[[str], Path], tmp_path: Path) -> None:
    source = tmp_path / "gemma-llava"
    shutil.copytree(demo_source("llava"), source)
    config = json.loads((source / "config.json").read_text())
    config["text_config"]["model_type"] = "gemma"
    (source / "config.json").write_text(json.dumps(config))

    result = vlmopt("export", source, "-o", tmp_path / "out")

    assert_bad_input(result, "'gemma'", "llama, mistral, qwen2")
    assert not (tmp_path / "out").exists()


def test_quantizing_a_part_model_without_part_modes_is_refused(llava: Path) -> None:
    _refused(llava, "quantize", llava, "--mode", "int4", fragments=("--part",))


@pytest.mark.parametrize(
    ("part", "fragment"),
    [("decoder=int3", "decoder part takes"), ("text=int4", "no part named text"), ("decoder", "PART=MODE"), ("vision=fp32", "every part fp32")],
)
def test_a_bad_part_mode_is_refused(llava: Path, part: str, fragment: str) -> None:
    _refused(llava, "quantize", llava, "--part", part, fragments=(fragment,))


def test_choosing_who_makes_the_decoder_of_an_encoder_is_refused(exported: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    clip = copy_model_dir(exported("clip"))

    _refused(clip, "convert", clip, "--decoder", "builder", fragments=("--decoder builder", "clip has no decoder"))
