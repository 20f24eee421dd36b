"""Messages that say what happened and what to do: each in one line, naming the flag or the limit."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import assert_bad_input, vlmopt


def _with_config(source: Path, dest: Path, **changes: object) -> Path:
    shutil.copytree(source, dest)
    config = json.loads((dest / "config.json").read_text())
    config.update(changes)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


AUTO_MAP = {"AutoConfig": "configuration_mine.MineConfig", "AutoModel": "modeling_mine.MineModel"}


def test_bench_errors_start_with_the_error_line(converted: Callable[[str], Path]) -> None:
    result = vlmopt("bench", converted("vit"), "--tower", "nope", "--batch", "1")

    assert result.exit_code == 2
    assert result.stderr.startswith("error: no tower named nope")


def test_the_remote_code_refusal_names_the_flag_that_allows_it(demo_source: Callable[[str], Path], tmp_path: Path) -> None:
    source = _with_config(demo_source("vit"), tmp_path / "custom", model_type="mine", auto_map=AUTO_MAP)

    result = vlmopt("export", source, "-o", tmp_path / "model")

    assert_bad_input(result, "own Python code", "--trust-remote-code")
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("trust", [False, True], ids=["default", "trust-remote-code"])
def test_a_known_model_type_with_its_own_code_exports_with_the_builtin_class_and_one_warning(
    trust: bool, demo_source: Callable[[str], Path], tmp_path: Path
) -> None:
    source = _with_config(demo_source("vit"), tmp_path / "custom", auto_map=AUTO_MAP)

    result = vlmopt("export", source, "-o", tmp_path / "model", *(["--trust-remote-code"] if trust else []))

    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, result.stderr
    assert "auto_map" in warnings[0] and "built-in vit classes" in warnings[0]
    assert ("not run, even with --trust-remote-code" if trust else "is ignored") in warnings[0]


def test_an_artifact_name_over_the_limit_is_refused_saying_the_limit(converted: Callable[[str], Path]) -> None:
    result = vlmopt("convert", converted("vit"), "--name", "a" * 65)

    assert_bad_input(result, "65 characters", "the limit is 64")


def test_a_model_directory_whose_name_is_not_utf8_is_refused_in_one_line(converted: Callable[[str], Path], tmp_path: Path) -> None:
    model_dir = tmp_path / os.fsdecode(b"model-\xff")
    shutil.copytree(converted("vit"), model_dir)

    result = vlmopt("bench", model_dir, "--batch", "1", "--iterations", "1")

    assert_bad_input(result, "model-\\xff", "not a valid UTF-8 path", "rename it")


def test_a_source_path_with_a_typo_is_refused_at_once_as_a_missing_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)

    result = vlmopt("export", "models/clip-typo", "-o", "out")

    assert_bad_input(result, "folder models/clip-typo does not exist", "hf://models/clip-typo")
    assert not (tmp_path / "out").exists()


def test_a_source_with_the_hub_prefix_is_read_as_a_hub_id_even_beside_a_local_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)

    result = vlmopt("export", "hf://models/clip-typo", "-o", "out")

    assert_bad_input(result, "cannot read a model config from hf://models/clip-typo")
