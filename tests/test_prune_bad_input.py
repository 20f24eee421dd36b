"""Input a user can get wrong in `prune`: exit 2, one line on stderr saying what was wrong, and nothing written."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import assert_bad_input, assert_refused, vlmopt

#: the tiny demo ViT has 4 heads per block
VIT_HEADS = 4


@pytest.fixture
def clip_dir(exported: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> Path:
    """A private copy of the exported tiny CLIP (only `hf`)."""
    return copy_model_dir(exported("clip"))


@pytest.fixture
def vit_dir(exported: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> Path:
    return copy_model_dir(exported("vit"))


def _refused(model_dir: Path, *args: object, fragments: tuple[str, ...] = ()) -> None:
    assert_refused(model_dir, "prune", *args, fragments=fragments)


def _exported(source: Path, model_dir: Path) -> Path:
    result = vlmopt("export", source, "-o", model_dir)
    assert result.exit_code == 0, f"export of {source.name} failed with exit {result.exit_code}: {result.stderr}"
    return model_dir


# -- flag values ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (("--mlp-ratio", "1.0"), ("--mlp-ratio", "[0, 1)")),
        (("--mlp-ratio", "-0.1"), ("--mlp-ratio", "[0, 1)")),
        (("--head-ratio", "1"), ("--head-ratio", "[0, 1)")),
        (("--sparsity", "1"), ("--sparsity", "[0, 1)")),
        (("--mlp-ratio", "0.2", "--score", "l3"), ("--score", "l3")),
        (("--pattern", "3:4"), ("--pattern", "3:4")),
        (("--pattern", "2:4", "--sparsity", "0.3"), ("2:4", "--sparsity 0.3")),
        (("--sparsity", "0.3", "--scope", "everywhere"), ("--scope", "everywhere")),
        (("--scope", "global", "--mlp-ratio", "0.2"), ("--scope global", "structured pruning")),
        ((), ("nothing to prune",)),
        (("--mlp-ratio", "0.2", "--calib-images", "photos"), ("--calib-images", "--score activation")),
        (("--mlp-ratio", "0.2", "--calib-text", "prompts.txt"), ("--calib-text", "--score activation")),
        (("--mlp-ratio", "0.2", "--score", "activation", "--calib-samples", "0"), ("--calib-samples",)),
        (("--mlp-ratio", "0.2", "--min-cosine", "1.5"), ("--min-cosine",)),
        (("--mlp-ratio", "0.2", "--tower", "nope"), ("nope", "vision, text")),
        (("--mlp-ratio", "0.2", "--from", "missing"), ("missing",)),
        (("--mlp-ratio", "0.2", "--name", "hf"), ("vlmopt export",)),
        (("--mlp-ratio", "0.2", "--name", "../escape"), ("../escape",)),
    ],
    ids=[
        "mlp-ratio-1",
        "mlp-ratio-negative",
        "head-ratio-1",
        "sparsity-1",
        "unknown-score",
        "pattern-3-4",
        "pattern-2-4-with-sparsity",
        "unknown-scope",
        "global-scope-for-structured-pruning",
        "nothing-to-prune",
        "calib-images-without-activation-score",
        "calib-text-without-activation-score",
        "calib-samples-0",
        "min-cosine-1.5",
        "unknown-tower",
        "missing-source",
        "over-the-export",
        "name-outside-the-directory",
    ],
)
def test_prune_with_an_invalid_flag_value_is_refused(flags: tuple[str, ...], fragments: tuple[str, ...], clip_dir: Path) -> None:
    _refused(clip_dir, *flags, fragments=fragments)


def test_calibration_prompts_that_do_not_exist_are_refused(tmp_path: Path, clip_dir: Path) -> None:
    _refused(clip_dir, "--mlp-ratio", "0.2", "--score", "activation", "--calib-text", tmp_path / "missing.txt", fragments=("not a file",))


# -- heads ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["clip", "siglip", "bert"])
def test_head_pruning_where_transformers_derives_the_head_size_is_refused_with_the_reason(
    family: str, exported: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]
) -> None:
    _refused(copy_model_dir(exported(family)), "--head-ratio", "0.25", fragments=("--head-ratio", family, "hidden_size / num_attention_heads", "head_dim"))


def test_head_ratio_that_would_remove_every_head_of_a_layer_is_refused(vit_dir: Path) -> None:
    assert VIT_HEADS - round(0.9 * VIT_HEADS) == 0

    _refused(vit_dir, "--head-ratio", "0.9", fragments=("--head-ratio 0.9", "every head", f"{VIT_HEADS} heads"))


def test_mlp_ratio_that_would_remove_every_neuron_of_a_layer_is_refused(clip_dir: Path) -> None:
    _refused(clip_dir, "--mlp-ratio", "0.995", fragments=("--mlp-ratio 0.995",))


# -- what the model is ----------------------------------------------------------------------------
def test_pruning_an_onnx_artifact_is_refused(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    _refused(copy_model_dir(converted("vit")), "--mlp-ratio", "0.2", "--from", "onnx", fragments=("Hugging Face", "'onnx'"))


@pytest.fixture(scope="module")
def distilbert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DistilBERT exported as `hf`: a family vlmopt exports but whose blocks structured pruning does not know."""
    import torch
    from transformers import DistilBertConfig, DistilBertModel

    root = tmp_path_factory.mktemp("distilbert")
    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=1024, dim=32, hidden_dim=64, n_heads=4, n_layers=2, max_position_embeddings=64)
    DistilBertModel(config).save_pretrained(root / "source", safe_serialization=True)
    return _exported(root / "source", root / "model")


@pytest.mark.parametrize("flags", [("--mlp-ratio", "0.25"), ("--sparsity", "0.5")], ids=["mlp-ratio", "sparsity"])
def test_pruning_an_architecture_without_a_known_block_layout_is_refused(
    flags: tuple[str, ...], distilbert_dir: Path, copy_model_dir: Callable[[Path], Path]
) -> None:
    _refused(copy_model_dir(distilbert_dir), *flags, fragments=("distilbert", "supports clip, siglip, vit, bert"))


@pytest.fixture(scope="module")
def blockless_vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ViT with no transformer blocks (num_hidden_layers=0), exported as `hf`: no MLP, no attention."""
    import torch
    from transformers import ViTConfig, ViTModel

    root = tmp_path_factory.mktemp("blockless-vit")
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=0, image_size=32, patch_size=8)
    ViTModel(config).save_pretrained(root / "source", safe_serialization=True)
    return _exported(root / "source", root / "model")


def test_mlp_ratio_on_a_model_without_mlps_is_refused(blockless_vit_dir: Path, copy_model_dir: Callable[[Path], Path]) -> None:
    _refused(copy_model_dir(blockless_vit_dir), "--mlp-ratio", "0.25", fragments=("--mlp-ratio", "vision tower has no MLP"))


def test_head_ratio_on_a_model_without_attention_is_refused(blockless_vit_dir: Path, copy_model_dir: Callable[[Path], Path]) -> None:
    _refused(copy_model_dir(blockless_vit_dir), "--head-ratio", "0.25", fragments=("--head-ratio",))


def test_sparsity_on_a_model_without_prunable_linears_is_refused(blockless_vit_dir: Path, copy_model_dir: Callable[[Path], Path]) -> None:
    _refused(copy_model_dir(blockless_vit_dir), "--sparsity", "0.5", fragments=("--sparsity",))


def test_pruning_a_model_directory_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "missing"

    result = vlmopt("prune", missing, "--mlp-ratio", "0.2")

    assert_bad_input(result, "does not exist")
    assert not missing.exists()
