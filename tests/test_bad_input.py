"""Input a user can get wrong: exit 2, one line on stderr saying what was wrong, and nothing changed."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import assert_bad_input, snapshot, vlmopt

QUICK_BENCH = ("--batch", "1", "--iterations", "1", "--warmup", "0")


@pytest.fixture
def clip_dir(exported: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> Path:
    """A private copy of the exported tiny CLIP: a model directory a failed export must not touch."""
    return copy_model_dir(exported("clip"))


# -- export: the source ---------------------------------------------------------------------------
def test_export_of_a_source_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    output = tmp_path / "model"

    result = vlmopt("export", tmp_path / "missing", "-o", output)

    assert_bad_input(result, "does not exist")
    assert not output.exists()


def test_export_of_a_folder_without_config_json_is_refused(tmp_path: Path, clip_dir: Path) -> None:
    source = tmp_path / "not-a-model"
    source.mkdir()
    (source / "README.md").write_text("no config here")
    before = snapshot(clip_dir)

    result = vlmopt("export", source, "-o", clip_dir)

    assert_bad_input(result, "config.json")
    assert snapshot(clip_dir) == before


def test_export_of_an_unsupported_architecture_lists_the_supported_types(tmp_path: Path, clip_dir: Path) -> None:
    from transformers import GPT2Config, GPT2Model

    source = tmp_path / "gpt2"
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    GPT2Model(config).save_pretrained(source)
    before = snapshot(clip_dir)

    result = vlmopt("export", source, "-o", clip_dir)

    assert_bad_input(result, "gpt2", "clip", "siglip", "vit", "bert")
    assert snapshot(clip_dir) == before


def test_export_of_corrupt_weights_is_refused(tmp_path: Path, demo_source: Callable[[str], Path], clip_dir: Path) -> None:
    source = tmp_path / "corrupt"
    shutil.copytree(demo_source("clip"), source)
    (source / "model.safetensors").write_bytes(b"\x00garbage, not safetensors\xff" * 64)
    before = snapshot(clip_dir)

    result = vlmopt("export", source, "-o", clip_dir)

    assert_bad_input(result, "weights")
    assert snapshot(clip_dir) == before


def test_export_of_only_pickled_weights_is_refused(tmp_path: Path, demo_source: Callable[[str], Path], clip_dir: Path) -> None:
    import torch
    from safetensors.torch import load_file

    source = tmp_path / "pickled"
    shutil.copytree(demo_source("bert"), source)
    torch.save(load_file(source / "model.safetensors"), source / "pytorch_model.bin")
    (source / "model.safetensors").unlink()
    before = snapshot(clip_dir)

    result = vlmopt("export", source, "-o", clip_dir)

    assert_bad_input(result, "pytorch_model.bin", "safetensors")
    assert snapshot(clip_dir) == before


# -- a model directory that is not there or not readable ---------------------------------------
@pytest.mark.parametrize("command", [("convert",), ("bench", *QUICK_BENCH), ("info",)], ids=["convert", "bench", "info"])
def test_a_model_directory_that_does_not_exist_is_refused(command: tuple[str, ...], tmp_path: Path) -> None:
    missing = tmp_path / "missing"

    result = vlmopt(command[0], missing, *command[1:])

    assert_bad_input(result, "does not exist")
    assert not missing.exists()


@pytest.mark.parametrize("command", [("convert",), ("bench", *QUICK_BENCH), ("info",)], ids=["convert", "bench", "info"])
def test_a_manifest_of_another_schema_version_is_refused(command: tuple[str, ...], clip_dir: Path) -> None:
    manifest_path = clip_dir / "vlmopt.json"
    data = json.loads(manifest_path.read_text())
    data["schema_version"] = 99
    manifest_path.write_text(json.dumps(data))
    before = snapshot(clip_dir)

    result = vlmopt(command[0], clip_dir, *command[1:])

    assert_bad_input(result, "schema version")
    assert snapshot(clip_dir) == before


def test_bench_of_a_truncated_onnx_file_is_refused(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("clip"))
    vision = model_dir / "onnx" / "vision.onnx"
    vision.write_bytes(vision.read_bytes()[: vision.stat().st_size // 3])
    before = snapshot(model_dir)

    result = vlmopt("bench", model_dir, "onnx", *QUICK_BENCH)

    assert_bad_input(result, "vision.onnx")
    assert snapshot(model_dir) == before


# -- flag values ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (("--opset", "5"), "--opset"),
        (("--static", "--batch-size", "0"), "--batch-size"),
        (("--static", "--seq-len", "0"), "--seq-len"),
        (("--batch-size", "4"), "--static"),
        (("--atol", "0"), "--atol"),
        (("--exporter", "tflite"), "--exporter"),
    ],
    ids=["opset-5", "static-batch-size-0", "static-seq-len-0", "batch-size-without-static", "atol-0", "unknown-exporter"],
)
def test_convert_with_an_invalid_flag_value_is_refused(flags: tuple[str, ...], fragment: str, clip_dir: Path) -> None:
    before = snapshot(clip_dir)

    result = vlmopt("convert", clip_dir, *flags)

    assert_bad_input(result, fragment)
    assert snapshot(clip_dir) == before


def test_convert_with_a_static_sequence_longer_than_the_model_is_refused(clip_dir: Path) -> None:
    before = snapshot(clip_dir)

    result = vlmopt("convert", clip_dir, "--static", "--seq-len", "4096")

    assert_bad_input(result, "--seq-len 4096")
    assert snapshot(clip_dir) == before
