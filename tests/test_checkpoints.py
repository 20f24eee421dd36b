"""Checkpoints as they come (issue 23): a tensor the checkpoint lacks is an error only when an exported output uses it.

A sentence-transformers checkpoint is often saved without its BERT pooler, which mean pooling never runs: that is one
warning line, not a refusal. A missing tensor an output does use stays an error (exit 2, nothing written)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from safetensors.numpy import load_file, save_file

from conftest import assert_bad_input, vlmopt


def _without(source: Path, folder: Path, prefix: str) -> Path:
    """A copy of the checkpoint in `source` with the tensors whose names start with `prefix` removed."""
    shutil.copytree(source, folder)
    weights = load_file(folder / "model.safetensors")
    dropped = {k: v for k, v in weights.items() if not k.startswith(prefix)}
    assert len(dropped) < len(weights), sorted(weights)[:5]
    save_file(dropped, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_a_checkpoint_without_the_pooler_that_mean_pooling_never_uses_exports_with_one_warning(demo_source: Callable[[str], Path], tmp_path: Path) -> None:
    source = _without(demo_source("bert"), tmp_path / "no-pooler", "pooler.")

    result = vlmopt("export", source, "-o", tmp_path / "model")

    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "pooler.dense" in line]
    assert len(warnings) == 1, result.stderr
    assert "no exported output uses" in warnings[0]
    assert (tmp_path / "model" / "hf" / "model.safetensors").is_file()


def test_a_checkpoint_missing_a_tensor_the_embedding_uses_is_refused_naming_it(demo_source: Callable[[str], Path], tmp_path: Path) -> None:
    source = _without(demo_source("bert"), tmp_path / "no-query", "encoder.layer.0.attention.self.query.")

    result = vlmopt("export", source, "-o", tmp_path / "model")

    assert_bad_input(result, "encoder.layer.0.attention.self.query", "missing")
    assert not (tmp_path / "model").exists()
