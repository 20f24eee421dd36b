"""Encoder backbones beyond ViT and BERT, each through every stage on its tiny demo checkpoint.

For each: export (the real `from_pretrained` on a saved local folder), convert (verified against PyTorch),
optimize (the attention fusion it gets, 0 where ONNX Runtime's optimizer has no matching fusion),
quantize int8, OpenVINO and bench. Classifiers are checked on their logits, with the top-1 class agreement
on the built-in photos.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import _Cache, assert_bad_input, manifest, vlmopt, vlmopt_json

#: demo family -> (family recorded, output names of its one tower)
BACKBONES: dict[str, tuple[str, tuple[str, ...]]] = {
    "dinov2": ("dinov2", ("image_embeds", "last_hidden_state")),
    "dinov2-registers": ("dinov2", ("image_embeds", "last_hidden_state")),
    "deit": ("deit", ("image_embeds",)),
    "beit": ("beit", ("image_embeds",)),
    "swin": ("swin", ("image_embeds",)),
    "convnext": ("convnext", ("image_embeds",)),
    "deit-classifier": ("deit", ("logits",)),
    "dinov2-classifier": ("dinov2", ("logits",)),
    "xlm-roberta": ("bert", ("sentence_embedding",)),
    "deberta-v2": ("deberta-v2", ("sentence_embedding",)),
    "modernbert": ("modernbert", ("sentence_embedding",)),
    "nomic-bert": ("nomic-bert", ("sentence_embedding",)),
}
#: families whose attention blocks ONNX Runtime's optimizer fuses in every layer (DINOv2's once its layer scale is folded
#: into the output projection); with registers every layer but the first, whose input is the token Concat; the others none
FUSES_ATTENTION = {"dinov2", "deit", "xlm-roberta", "deit-classifier", "dinov2-classifier"}
FUSES_ALL_BUT_THE_FIRST = {"dinov2-registers"}
CLASSIFIERS = [name for name, (_, outputs) in BACKBONES.items() if outputs == ("logits",)]
QUICK_BENCH = ("--batch", "2", "--iterations", "2", "--warmup", "0")


def _tower(family: str) -> str:
    return "text" if BACKBONES[family][1] == ("sentence_embedding",) else "vision"


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory, exported: Callable[[str], Path]) -> Callable[[str], tuple[Path, dict[str, Any]]]:
    """(model directory, each stage's --json report) of a backbone taken through convert, optimize, quantize int8, openvino and bench."""
    root = tmp_path_factory.mktemp("backbones")

    def make(family: str) -> tuple[Path, dict[str, Any]]:
        model_dir = root / family
        shutil.copytree(exported(family), model_dir)
        reports = {
            "convert": vlmopt_json("convert", model_dir),
            "optimize": vlmopt_json("optimize", model_dir),
            "quantize": vlmopt_json("quantize", model_dir, "--mode", "int8-dynamic", "--from", "onnx-opt", "--fallback"),
            "openvino": vlmopt_json("openvino", model_dir),
        }
        reports["bench"] = vlmopt_json("bench", model_dir, *QUICK_BENCH)
        return model_dir, reports

    return _Cache(make)


@pytest.mark.parametrize("family", BACKBONES)
def test_backbone_demo_reloads_with_from_pretrained_as_its_model_type(family: str, demo_source: Callable[[str], Path]) -> None:
    from transformers import AutoConfig

    from vlmopt.hf import load_model

    folder = demo_source(family)
    model = load_model(folder)

    assert model.config.model_type == AutoConfig.from_pretrained(folder).model_type
    assert (folder / "model.safetensors").is_file()


@pytest.mark.parametrize("family", BACKBONES)
def test_backbone_exports_as_its_family(family: str, exported: Callable[[str], Path]) -> None:
    traits = manifest(exported(family))["artifacts"]["hf"]["traits"]

    assert traits["family"] == BACKBONES[family][0]


@pytest.mark.parametrize("family", BACKBONES)
def test_backbone_converts_to_its_declared_outputs_verified_against_pytorch(family: str, staged: Callable[[str], tuple[Path, dict[str, Any]]]) -> None:
    model_dir, reports = staged(family)
    artifact = manifest(model_dir)["artifacts"]["onnx"]

    assert artifact["verification"]["passed"] is True
    assert [o["name"] for o in artifact["towers"][_tower(family)]["outputs"]] == list(BACKBONES[family][1])


@pytest.mark.parametrize("family", BACKBONES)
def test_optimize_records_the_attention_it_fused_in_every_backbone(family: str, staged: Callable[[str], tuple[Path, dict[str, Any]]]) -> None:
    _, reports = staged(family)
    artifact = reports["optimize"]["artifact"]
    recorded = artifact["record"]["towers"][_tower(family)]
    fused = recorded["fused"].get("Attention", 0) + recorded["fused"].get("MultiHeadAttention", 0)

    assert artifact["verification"]["passed"] is True
    assert recorded["attention_layers"] > 0 or family == "convnext"
    layers = recorded["attention_layers"]
    assert fused == (layers if family in FUSES_ATTENTION else layers - 1 if family in FUSES_ALL_BUT_THE_FIRST else 0)


@pytest.mark.parametrize("family", BACKBONES)
def test_int8_dynamic_quantization_of_every_backbone_passes_its_gate(family: str, staged: Callable[[str], tuple[Path, dict[str, Any]]]) -> None:
    _, reports = staged(family)
    artifact = reports["quantize"]["artifact"]

    assert artifact["verification"]["passed"] is True
    assert artifact["traits"]["precision"] == "int8-dynamic"


@pytest.mark.parametrize("family", BACKBONES)
def test_openvino_ir_of_every_backbone_is_verified(family: str, staged: Callable[[str], tuple[Path, dict[str, Any]]]) -> None:
    model_dir, reports = staged(family)
    artifact = reports["openvino"]["artifact"]

    assert artifact["verification"]["passed"] is True
    assert (model_dir / artifact["name"] / f"{_tower(family)}.xml").is_file()


@pytest.mark.parametrize("family", BACKBONES)
def test_bench_measures_every_artifact_of_every_backbone(family: str, staged: Callable[[str], tuple[Path, dict[str, Any]]]) -> None:
    _, reports = staged(family)
    measured = {row["artifact"] for row in reports["bench"]["rows"] if row["latency_ms"]["iterations"] == 2}

    assert measured == {"hf", "onnx", "onnx-opt", reports["quantize"]["artifact"]["name"], reports["openvino"]["artifact"]["name"]}
    assert reports["bench"]["not_measured"] == []


@pytest.mark.parametrize("family", CLASSIFIERS)
def test_classifier_variants_record_top1_class_agreement_on_the_built_in_photos(family: str, staged: Callable[[str], tuple[Path, dict[str, Any]]]) -> None:
    _, reports = staged(family)
    (metric,) = [m for m in reports["quantize"]["artifact"]["verification"]["metrics"] if m["name"] == "classification top-1 agreement"]

    assert "built-in photos" in metric["data"]
    assert metric["detail"]["images"] == 10
    assert 0.0 <= metric["value"] <= 1.0


# -- a config that lacks what its family needs -----------------------------------------------------
@pytest.mark.parametrize(
    ("family", "field"),
    [
        ("dinov2", "patch_size"),
        ("dinov2-registers", "num_register_tokens"),
        ("swin", "window_size"),
        ("convnext", "hidden_sizes"),
        ("deberta-v2", "vocab_size"),
        ("modernbert", "max_position_embeddings"),
    ],
)
def test_export_refuses_a_config_without_a_field_its_family_needs_naming_it(
    family: str, field: str, demo_source: Callable[[str], Path], tmp_path: Path
) -> None:
    source = tmp_path / "checkpoint"
    shutil.copytree(demo_source(family), source)
    config = json.loads((source / "config.json").read_text())
    del config[field]
    (source / "config.json").write_text(json.dumps(config))
    target = tmp_path / "model"

    result = vlmopt("export", source, "-o", target)

    assert_bad_input(result, f"'{field}'", BACKBONES[family][0])
    assert not target.exists()


def test_export_refuses_a_config_whose_field_is_null(demo_source: Callable[[str], Path], tmp_path: Path) -> None:
    source = tmp_path / "checkpoint"
    shutil.copytree(demo_source("deit"), source)
    config = json.loads((source / "config.json").read_text())
    config["image_size"] = None
    (source / "config.json").write_text(json.dumps(config))

    target = tmp_path / "model"

    assert_bad_input(vlmopt("export", source, "-o", target), "'image_size'")
    assert not target.exists()


# -- DINOv2: the processor's input size ------------------------------------------------------------
@pytest.mark.parametrize("family", ["dinov2", "dinov2-registers"])
def test_dinov2_takes_the_size_its_processor_crops_with_the_outputs_transformers_computes_at_it(family: str, demo_source: Callable[[str], Path]) -> None:
    import torch

    from vlmopt.families import family_for
    from vlmopt.hf import load_model

    folder = demo_source(family)
    untouched, prepared = load_model(folder), load_model(folder)
    (tower,) = family_for(prepared.config).towers(prepared.config, folder)
    crop = json.loads((folder / "preprocessor_config.json").read_text())["crop_size"]["height"]
    pixels = torch.randn(2, 3, crop, crop, generator=torch.Generator().manual_seed(0))

    with torch.no_grad():
        expected = untouched(pixel_values=pixels)
        pooled, dense = tower.wrap(prepared)(pixels)

    assert tower.inputs[0].shape == ("batch", 3, crop, crop)
    assert crop != untouched.config.image_size
    torch.testing.assert_close(pooled, expected.pooler_output)
    torch.testing.assert_close(dense, expected.last_hidden_state)
