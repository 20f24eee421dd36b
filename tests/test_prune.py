"""`vlmopt prune`: structured pruning that physically shrinks MLPs (and ViT's heads) into a checkpoint that reloads
with plain `from_pretrained`, magnitude and 2:4 sparsity made permanent in the safetensors, and a report of what it cost."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import Result
from safetensors.numpy import load_file

from conftest import TOWERS, leftovers, manifest, snapshot, vlmopt, vlmopt_json

PRUNED_FAMILIES = ("clip", "siglip", "vit", "bert")
#: the tiny demo models (conftest): every tower has 2 blocks, hidden size 32, MLPs of 64 neurons, 4 heads of 8
HIDDEN, MLP, HEADS, HEAD_DIM = 32, 64, 4, 8
MLP_RATIO = 0.25
MLP_KEPT = MLP - round(MLP_RATIO * MLP)  # 48
HEADS_KEPT = HEADS - round(0.25 * HEADS)  # 3
STRUCTURED = {
    "clip": ("--mlp-ratio", MLP_RATIO),
    "siglip": ("--mlp-ratio", MLP_RATIO),
    "vit": ("--mlp-ratio", MLP_RATIO, "--head-ratio", 0.25),
    "bert": ("--mlp-ratio", MLP_RATIO),
}
#: module names (as transformers holds them in memory) of the MLP up and down projections
UP = {"clip": r"mlp\.fc1$", "siglip": r"mlp\.fc1$", "vit": r"mlp\.fc1$", "bert": r"intermediate\.dense$"}
DOWN = {"clip": r"mlp\.fc2$", "siglip": r"mlp\.fc2$", "vit": r"mlp\.fc2$", "bert": r"layer\.\d+\.output\.dense$"}
#: MLPs per model: 2 blocks per tower, and SigLIP's vision tower ends in an attention-pooling head with its own MLP
MLP_COUNT = {"clip": 4, "siglip": 5, "vit": 2, "bert": 2}
#: safetensors keys (as saved) of the tensors structured pruning shrinks; every other tensor must come out untouched
SHRUNK = {
    "clip": r"mlp\.fc1\.(weight|bias)$|mlp\.fc2\.weight$",
    "siglip": r"mlp\.fc1\.(weight|bias)$|mlp\.fc2\.weight$",
    "vit": r"intermediate\.dense\.(weight|bias)$|layer\.\d+\.output\.dense\.weight$"
    r"|attention\.attention\.(query|key|value)\.(weight|bias)$|attention\.output\.dense\.weight$",
    "bert": r"intermediate\.dense\.(weight|bias)$|layer\.\d+\.output\.dense\.weight$",
}
#: safetensors key prefixes of each tower of the dual encoders (single-tower models: every key)
TOWER_PREFIX = {"vision": ("vision_model.", "visual_projection."), "text": ("text_model.", "text_projection.")}
#: the Linears sparsity zeroes in the tiny CLIP: q/k/v/out and fc1/fc2 of every block of both towers
CLIP_LINEAR = re.compile(r"^(vision|text)_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])\.weight$")
PROMPTS = ["a photo of a cat", "a photo of a dog", "a red car on the street", "a small bird in the sky", "a horse near the river", "a ship at sunset"]
QUICK_BENCH = ("--iterations", "1", "--warmup", "0", "--batch", "1")


# -- helpers --------------------------------------------------------------------------------------
def _weights(model_dir: Path, artifact: str) -> dict[str, np.ndarray]:
    return load_file(model_dir / artifact / "model.safetensors")


def _config(model_dir: Path, artifact: str) -> dict[str, Any]:
    return json.loads((model_dir / artifact / "config.json").read_text())


def _tower_keys(weights: dict[str, np.ndarray], family: str, tower: str) -> list[str]:
    if len(TOWERS[family]) == 1:
        return list(weights)
    return [k for k in weights if k.startswith(TOWER_PREFIX[tower])]


def _linears(model: Any, pattern: str) -> dict[str, Any]:
    from torch import nn

    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and re.search(pattern, name)}


def _kept_neurons(original_up: np.ndarray, pruned_up: np.ndarray) -> list[int]:
    """Which rows of the original up projection the pruned one kept, found by their (unchanged) weights."""
    kept = []
    for row in pruned_up:
        (matches,) = np.nonzero((original_up == row).all(axis=1))
        assert len(matches) == 1, "a pruned row is not one of the original rows"
        kept.append(int(matches[0]))
    return kept


def _top(scores: np.ndarray, count: int) -> list[int]:
    return sorted(int(i) for i in np.argsort(-scores, kind="stable")[:count])


def _zero_fraction(weight: np.ndarray) -> float:
    return float((weight == 0).mean())


def _write_images(folder: Path, count: int = 4) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (36 + 4 * i, 40, 3), dtype=np.uint8)).save(folder / f"image{i}.png")
    return folder


def _write_prompts(path: Path, prompts: list[str] = PROMPTS) -> Path:
    path.write_text("\n".join(prompts) + "\n")
    return path


# -- structured pruning of every family, made once ------------------------------------------------
@pytest.fixture(scope="module")
def structured(tmp_path_factory: pytest.TempPathFactory, exported: Callable[[str], Path]) -> Callable[[str], tuple[Path, dict[str, Any]]]:
    """(model directory, the `hf-pruned` artifact as --json reported it) of a family pruned with STRUCTURED[family]."""
    root = tmp_path_factory.mktemp("structured")
    made: dict[str, tuple[Path, dict[str, Any]]] = {}

    def make(family: str) -> tuple[Path, dict[str, Any]]:
        if family not in made:
            model_dir = root / family
            shutil.copytree(exported(family), model_dir)
            made[family] = (model_dir, vlmopt_json("prune", model_dir, *STRUCTURED[family])["artifact"])
        return made[family]

    return make


@pytest.mark.parametrize("family", PRUNED_FAMILIES)
def test_mlp_pruning_removes_the_asked_fraction_of_neurons_from_every_mlp(family: str, structured: Callable[[str], tuple[Path, dict[str, Any]]]) -> None:
    from transformers import AutoModel

    model_dir, _ = structured(family)
    model = AutoModel.from_pretrained(model_dir / "hf-pruned")

    ups, downs = _linears(model, UP[family]), _linears(model, DOWN[family])
    assert len(ups) == len(downs) == MLP_COUNT[family]
    assert {name: m.out_features for name, m in ups.items()} == dict.fromkeys(ups, MLP_KEPT)
    assert {name: m.in_features for name, m in downs.items()} == dict.fromkeys(downs, MLP_KEPT)


@pytest.mark.parametrize("family", PRUNED_FAMILIES)
def test_mlp_pruning_patches_intermediate_size_in_the_config_of_every_tower(family: str, structured: Callable[[str], tuple[Path, dict[str, Any]]]) -> None:
    model_dir, _ = structured(family)
    config = _config(model_dir, "hf-pruned")

    if len(TOWERS[family]) == 2:
        assert (config["vision_config"]["intermediate_size"], config["text_config"]["intermediate_size"]) == (MLP_KEPT, MLP_KEPT)
    else:
        assert config["intermediate_size"] == MLP_KEPT


def test_head_pruning_keeps_whole_heads_and_writes_heads_and_head_dim_into_the_vit_config(
    structured: Callable[[str], tuple[Path, dict[str, Any]]],
) -> None:
    from transformers import AutoModel

    model_dir, _ = structured("vit")
    config = _config(model_dir, "hf-pruned")
    model = AutoModel.from_pretrained(model_dir / "hf-pruned")

    assert (config["num_attention_heads"], config["head_dim"], config["hidden_size"]) == (HEADS_KEPT, HEAD_DIM, HIDDEN)
    projections = _linears(model, r"attention\.(q|k|v)_proj$")
    outputs = _linears(model, r"attention\.o_proj$")
    assert len(projections) == 3 * 2 and len(outputs) == 2
    assert {(m.in_features, m.out_features) for m in projections.values()} == {(HIDDEN, HEADS_KEPT * HEAD_DIM)}
    assert {(m.in_features, m.out_features) for m in outputs.values()} == {(HEADS_KEPT * HEAD_DIM, HIDDEN)}


@pytest.mark.parametrize("family", ["clip", "siglip", "bert"])
def test_mlp_pruning_alone_keeps_every_head(family: str, structured: Callable[[str], tuple[Path, dict[str, Any]]]) -> None:
    model_dir, artifact = structured(family)
    config = _config(model_dir, "hf-pruned")

    sub_configs = [config["vision_config"], config["text_config"]] if len(TOWERS[family]) == 2 else [config]
    assert [c["num_attention_heads"] for c in sub_configs] == [HEADS] * len(sub_configs)
    assert all("heads" not in recorded for recorded in artifact["record"]["towers"].values())


@pytest.mark.parametrize("family", PRUNED_FAMILIES)
def test_structured_pruning_shrinks_only_the_pruned_linears_and_leaves_every_other_tensor_untouched(
    family: str, structured: Callable[[str], tuple[Path, dict[str, Any]]]
) -> None:
    model_dir, _ = structured(family)
    original, pruned = _weights(model_dir, "hf"), _weights(model_dir, "hf-pruned")

    assert sorted(pruned) == sorted(original)
    shrunk = sorted(k for k in original if pruned[k].shape != original[k].shape)
    assert shrunk == sorted(k for k in original if re.search(SHRUNK[family], k))
    for key in original.keys() - set(shrunk):
        np.testing.assert_array_equal(pruned[key], original[key], err_msg=key)


@pytest.mark.parametrize("family", PRUNED_FAMILIES)
def test_manifest_records_mlp_neurons_and_heads_before_and_after_for_every_tower(family: str, structured: Callable[[str], tuple[Path, dict[str, Any]]]) -> None:
    model_dir, artifact = structured(family)

    assert manifest(model_dir)["artifacts"]["hf-pruned"]["record"] == artifact["record"]
    assert sorted(artifact["record"]["towers"]) == sorted(TOWERS[family])
    for recorded in artifact["record"]["towers"].values():
        assert recorded["mlp"] == {"before": MLP, "after": MLP_KEPT}
        if family == "vit":
            assert recorded["heads"] == {"before": HEADS, "after": HEADS_KEPT, "head_dim": HEAD_DIM}


@pytest.mark.parametrize("family", PRUNED_FAMILIES)
def test_reported_parameter_drop_equals_the_weights_removed_from_the_checkpoint(family: str, structured: Callable[[str], tuple[Path, dict[str, Any]]]) -> None:
    model_dir, artifact = structured(family)
    original, pruned = _weights(model_dir, "hf"), _weights(model_dir, "hf-pruned")

    for tower, recorded in artifact["record"]["towers"].items():
        removed = sum(original[k].size - pruned[k].size for k in _tower_keys(original, family, tower))
        assert removed > 0, tower
        assert recorded["parameters_before"] - recorded["parameters_after"] == removed, tower


@pytest.mark.parametrize("family", PRUNED_FAMILIES)
def test_reported_flops_per_item_fall(family: str, structured: Callable[[str], tuple[Path, dict[str, Any]]]) -> None:
    _, artifact = structured(family)

    for tower, recorded in artifact["record"]["towers"].items():
        assert 0 < recorded["flops_after"] < recorded["flops_before"], tower


@pytest.mark.parametrize("family", PRUNED_FAMILIES)
def test_pruned_model_is_checked_against_the_unpruned_one_with_a_cosine_per_tower(
    family: str, structured: Callable[[str], tuple[Path, dict[str, Any]]]
) -> None:
    _, artifact = structured(family)
    verification = artifact["verification"]

    assert verification["passed"] is True
    assert verification["reference"] == "hf"
    assert sorted(verification["towers"]) == sorted(TOWERS[family])
    for tower, checks in verification["towers"].items():
        for output in (o for check in checks for o in check["outputs"].values()):
            assert 0 < output["cosine_min"] <= output["cosine_mean"] <= 1 + 1e-9, tower
            assert output["cosine_mean"] < 1 - 1e-6, f"{tower}: pruning changed nothing"


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_pruned_dual_encoder_records_zero_shot_agreement_with_the_unpruned_one(family: str, structured: Callable[[str], tuple[Path, dict[str, Any]]]) -> None:
    (zero_shot,) = structured(family)[1]["verification"]["metrics"]

    assert 0 <= zero_shot["value"] <= 1
    assert zero_shot["detail"]["images"] > 1 and zero_shot["detail"]["prompts"] > 1


def test_pruned_artifact_is_a_hugging_face_artifact_made_from_hf_and_not_fine_tuned(structured: Callable[[str], tuple[Path, dict[str, Any]]]) -> None:
    model_dir, artifact = structured("clip")

    assert (artifact["kind"], artifact["stage"], artifact["parent"]) == ("hf", "prune", "hf")
    assert artifact["parent_digest"] == manifest(model_dir)["artifacts"]["hf"]["digest"]
    assert artifact["record"]["fine_tuned"] is False
    assert artifact["record"]["pruned_towers"] == ["vision", "text"]


def test_pruned_artifact_keeps_the_tokenizer_and_processor_of_its_parent(structured: Callable[[str], tuple[Path, dict[str, Any]]]) -> None:
    model_dir, _ = structured("clip")

    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json"):
        assert (model_dir / "hf-pruned" / name).read_bytes() == (model_dir / "hf" / name).read_bytes(), name


def test_magnitude_pruning_records_no_calibration(structured: Callable[[str], tuple[Path, dict[str, Any]]]) -> None:
    assert "calibration" not in structured("clip")[1]["record"]


def test_rerun_with_the_same_options_is_skipped_and_changes_nothing(structured: Callable[[str], tuple[Path, dict[str, Any]]]) -> None:
    model_dir, _ = structured("clip")
    before = snapshot(model_dir)

    report = vlmopt_json("prune", model_dir, *STRUCTURED["clip"])

    assert report["skipped"] is True
    assert snapshot(model_dir) == before


# -- which neurons are kept -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory, structured: Callable[[str], tuple[Path, dict[str, Any]]]) -> tuple[Path, dict[str, Result]]:
    """(the tiny CLIP with `hf-pruned` (l2, from the structured run), `hf-l1` and `hf-activation` (real images and prompts),
    each removing 25% of the MLP neurons; the CLI result per artifact)."""
    root = tmp_path_factory.mktemp("scored")
    model_dir = root / "clip"
    shutil.copytree(structured("clip")[0], model_dir)
    data = ("--calib-images", _write_images(root / "images"), "--calib-text", _write_prompts(root / "prompts.txt"))
    results = {
        "hf-l1": vlmopt("prune", model_dir, "--mlp-ratio", MLP_RATIO, "--score", "l1", "--name", "hf-l1", "--json"),
        "hf-activation": vlmopt("prune", model_dir, "--mlp-ratio", MLP_RATIO, "--score", "activation", *data, "--name", "hf-activation", "--json"),
    }
    for name, result in results.items():
        assert result.exit_code == 0, f"{name}: exit {result.exit_code}: {result.stderr}"
    return model_dir, results


def _mlp_layers(weights: dict[str, np.ndarray]) -> list[str]:
    """The prefixes of the tiny CLIP's MLPs (`vision_model.encoder.layers.0.mlp.`, ...)."""
    return sorted(k.removesuffix("fc1.weight") for k in weights if k.endswith("mlp.fc1.weight"))


def _kept_by(model_dir: Path, artifact: str) -> dict[str, list[int]]:
    original, pruned = _weights(model_dir, "hf"), _weights(model_dir, artifact)
    return {mlp: _kept_neurons(original[mlp + "fc1.weight"], pruned[mlp + "fc1.weight"]) for mlp in _mlp_layers(original)}


def test_kept_neurons_keep_their_weights_and_biases_in_their_original_order(structured: Callable[[str], tuple[Path, dict[str, Any]]]) -> None:
    model_dir, _ = structured("clip")
    original, pruned = _weights(model_dir, "hf"), _weights(model_dir, "hf-pruned")

    assert len(_mlp_layers(original)) == 4
    for mlp, kept in _kept_by(model_dir, "hf-pruned").items():
        assert kept == sorted(kept) and len(kept) == MLP_KEPT, mlp
        np.testing.assert_array_equal(pruned[mlp + "fc1.bias"], original[mlp + "fc1.bias"][kept])
        np.testing.assert_array_equal(pruned[mlp + "fc2.weight"], original[mlp + "fc2.weight"][:, kept])
        np.testing.assert_array_equal(pruned[mlp + "fc2.bias"], original[mlp + "fc2.bias"])


@pytest.mark.parametrize(("artifact", "order"), [("hf-pruned", 2), ("hf-l1", 1)], ids=["l2", "l1"])
def test_magnitude_score_keeps_the_neurons_whose_up_row_and_down_column_weigh_most(artifact: str, order: int, scored: tuple[Path, dict[str, Result]]) -> None:
    """A neuron's weight is the norm of its row of the up projection times that of its column of the down projection."""
    model_dir, _ = scored
    original = _weights(model_dir, "hf")

    for mlp, kept in _kept_by(model_dir, artifact).items():
        up, down = original[mlp + "fc1.weight"].astype(np.float64), original[mlp + "fc2.weight"].astype(np.float64)
        scores = np.linalg.norm(up, ord=order, axis=1) * np.linalg.norm(down, ord=order, axis=0)
        assert kept == _top(scores, MLP_KEPT), mlp


def test_l1_l2_and_activation_scores_keep_different_neurons(scored: tuple[Path, dict[str, Result]]) -> None:
    model_dir, _ = scored
    kept = {artifact: _kept_by(model_dir, artifact) for artifact in ("hf-pruned", "hf-l1", "hf-activation")}

    for a, b in [("hf-pruned", "hf-l1"), ("hf-pruned", "hf-activation"), ("hf-l1", "hf-activation")]:
        assert kept[a] != kept[b], f"{a} and {b} kept the same neurons in every layer"


def test_activation_score_with_images_and_prompts_records_real_calibration_for_both_towers(scored: tuple[Path, dict[str, Result]]) -> None:
    calibration = json.loads(scored[1]["hf-activation"].stdout)["artifact"]["record"]["calibration"]

    assert calibration == {
        "vision": {"data": "real", "samples": 4, "method": "activation"},
        "text": {"data": "real", "samples": len(PROMPTS), "method": "activation"},
    }


def test_activation_score_with_real_data_gives_no_synthetic_warning(scored: tuple[Path, dict[str, Result]]) -> None:
    assert "SYNTHETIC" not in scored[1]["hf-activation"].stderr


@pytest.fixture(scope="module")
def synthetic_scored(tmp_path_factory: pytest.TempPathFactory, exported: Callable[[str], Path]) -> Result:
    """The CLI result of the tiny ViT pruned with --score activation and no calibration data."""
    model_dir = tmp_path_factory.mktemp("synthetic-scored") / "vit"
    shutil.copytree(exported("vit"), model_dir)
    result = vlmopt("prune", model_dir, "--mlp-ratio", MLP_RATIO, "--score", "activation", "--json")
    assert result.exit_code == 0, result.stderr
    return result


def test_activation_score_without_data_warns_in_capitals_that_it_used_synthetic_inputs(synthetic_scored: Result) -> None:
    assert "SYNTHETIC" in synthetic_scored.stderr
    assert "--calib-images" in synthetic_scored.stderr


def test_activation_score_without_data_records_synthetic_calibration(synthetic_scored: Result) -> None:
    calibration = json.loads(synthetic_scored.stdout)["artifact"]["record"]["calibration"]

    assert calibration["vision"]["data"] == "synthetic"
    assert calibration["vision"]["samples"] > 0


def test_rerun_after_the_calibration_prompts_changed_is_redone(tmp_path: Path, exported: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(exported("clip"))
    prompts = _write_prompts(tmp_path / "prompts.txt")
    flags = ("--mlp-ratio", MLP_RATIO, "--score", "activation", "--calib-text", prompts)
    vlmopt_json("prune", model_dir, *flags)
    _write_prompts(prompts, ["a blue truck", "a green frog", "a white horse at night"])

    report = vlmopt_json("prune", model_dir, *flags)

    assert report["skipped"] is False
    assert report["artifact"]["record"]["calibration"]["text"]["samples"] == 3


# -- towers ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vision_only(tmp_path_factory: pytest.TempPathFactory, exported: Callable[[str], Path]) -> tuple[Path, Result]:
    """(the tiny CLIP with only its vision tower pruned, the CLI result of that run, with the human report)."""
    model_dir = tmp_path_factory.mktemp("vision-only") / "clip"
    shutil.copytree(exported("clip"), model_dir)
    result = vlmopt("prune", model_dir, "--mlp-ratio", MLP_RATIO, "--tower", "vision")
    assert result.exit_code == 0, result.stderr
    return model_dir, result


def test_tower_vision_prunes_only_the_vision_tower_of_clip(vision_only: tuple[Path, Result]) -> None:
    model_dir, _ = vision_only
    config = _config(model_dir, "hf-pruned")
    original, pruned = _weights(model_dir, "hf"), _weights(model_dir, "hf-pruned")

    assert (config["vision_config"]["intermediate_size"], config["text_config"]["intermediate_size"]) == (MLP_KEPT, MLP)
    for key in _tower_keys(original, "clip", "text"):
        np.testing.assert_array_equal(pruned[key], original[key], err_msg=key)
    assert pruned["vision_model.encoder.layers.0.mlp.fc1.weight"].shape == (MLP_KEPT, HIDDEN)


def test_tower_vision_reports_and_checks_only_the_vision_tower(vision_only: tuple[Path, Result]) -> None:
    artifact = manifest(vision_only[0])["artifacts"]["hf-pruned"]

    assert list(artifact["record"]["towers"]) == ["vision"]
    assert artifact["record"]["pruned_towers"] == ["vision"]
    assert list(artifact["verification"]["towers"]) == ["vision"]


def test_human_report_says_the_pruned_model_was_not_fine_tuned(vision_only: tuple[Path, Result]) -> None:
    stdout = vision_only[1].stdout

    assert "no fine-tun" in stdout
    assert f"{MLP} -> {MLP_KEPT}" in stdout


def test_naming_a_tower_twice_prunes_it_once(exported: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(exported("clip"))

    artifact = vlmopt_json("prune", model_dir, "--mlp-ratio", MLP_RATIO, "--tower", "vision", "--tower", "vision")["artifact"]

    assert _config(model_dir, "hf-pruned")["vision_config"]["intermediate_size"] == MLP_KEPT
    assert artifact["record"]["towers"]["vision"]["mlp"] == {"before": MLP, "after": MLP_KEPT}


# -- the pruned checkpoint outside vlmopt ---------------------------------------------------------
_RELOAD = r"""
import json, sys
import torch
from transformers import AutoModel

torch.manual_seed(0)
report = {}
for family, folder in json.loads(sys.argv[1]).items():
    model, info = AutoModel.from_pretrained(folder, output_loading_info=True)
    model.eval()
    images = torch.randn(2, 3, 32, 32)
    text = torch.randint(0, 1000, (3, 8))
    with torch.inference_mode():
        if family in ("clip", "siglip"):
            out = model(pixel_values=images, input_ids=text)
            outputs = {"image_embeds": out.image_embeds, "text_embeds": out.text_embeds, "logits_per_image": out.logits_per_image}
        elif family == "vit":
            outputs = {"pooler_output": model(pixel_values=images).pooler_output}
        else:
            outputs = {"last_hidden_state": model(input_ids=text, attention_mask=torch.ones_like(text)).last_hidden_state}
    report[family] = {
        "class": type(model).__name__,
        "loading": {k: sorted(map(str, v)) for k, v in info.items() if v},
        "outputs": {k: [list(v.shape), bool(torch.isfinite(v).all())] for k, v in outputs.items()},
    }
report["vlmopt imported"] = any(m == "vlmopt" or m.startswith("vlmopt.") for m in sys.modules)
print(json.dumps(report))
"""
RELOADED = {
    "clip": ("CLIPModel", {"image_embeds": [[2, 16], True], "text_embeds": [[3, 16], True], "logits_per_image": [[2, 3], True]}),
    "siglip": ("SiglipModel", {"image_embeds": [[2, 32], True], "text_embeds": [[3, 32], True], "logits_per_image": [[2, 3], True]}),
    "vit": ("ViTModel", {"pooler_output": [[2, 32], True]}),
    "bert": ("BertModel", {"last_hidden_state": [[3, 8, 32], True]}),
}


@pytest.fixture(scope="module")
def reloaded(structured: Callable[[str], tuple[Path, dict[str, Any]]]) -> dict[str, Any]:
    """What a fresh Python that imports only transformers reports after loading every family's `hf-pruned`."""
    folders = {family: str(structured(family)[0] / "hf-pruned") for family in PRUNED_FAMILIES}
    done = subprocess.run([sys.executable, "-c", _RELOAD, json.dumps(folders)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_reload_runs_without_importing_vlmopt(reloaded: dict[str, Any]) -> None:
    assert reloaded["vlmopt imported"] is False


@pytest.mark.parametrize("family", PRUNED_FAMILIES)
def test_pruned_checkpoint_reloads_with_plain_from_pretrained_with_every_weight_in_place(family: str, reloaded: dict[str, Any]) -> None:
    """No missing, unexpected or mismatched weights: nothing was re-initialized on load."""
    assert reloaded[family]["class"] == RELOADED[family][0]
    assert reloaded[family]["loading"] == {}


@pytest.mark.parametrize("family", PRUNED_FAMILIES)
def test_reloaded_pruned_checkpoint_gives_finite_outputs_of_the_usual_shapes(family: str, reloaded: dict[str, Any]) -> None:
    assert reloaded[family]["outputs"] == RELOADED[family][1]


# -- the pruned checkpoint through convert, quantize and bench ------------------------------------
def _weight_matmul_shapes(model: onnx.ModelProto) -> Counter[tuple[int, ...]]:
    initializers = {i.name: tuple(i.dims) for i in model.graph.initializer}
    return Counter(initializers[i] for n in model.graph.node if n.op_type in ("MatMul", "Gemm") for i in n.input if i in initializers)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, structured: Callable[[str], tuple[Path, dict[str, Any]]]) -> tuple[Path, dict[str, Any]]:
    """(the pruned tiny CLIP converted to `onnx-pruned`, quantized to `int8-pruned`, the --json report of benchmarking onnx-pruned)."""
    model_dir = tmp_path_factory.mktemp("pipeline") / "clip"
    shutil.copytree(structured("clip")[0], model_dir)
    vlmopt_json("convert", model_dir, "--from", "hf-pruned", "--name", "onnx-pruned")
    vlmopt_json("quantize", model_dir, "--from", "onnx-pruned", "--mode", "int8-dynamic", "--name", "int8-pruned")
    return model_dir, vlmopt_json("bench", model_dir, "onnx-pruned", *QUICK_BENCH)


def test_pruned_checkpoint_converts_to_onnx_recorded_as_made_from_it(pipeline: tuple[Path, dict[str, Any]]) -> None:
    model_dir, _ = pipeline
    artifact = manifest(model_dir)["artifacts"]["onnx-pruned"]

    assert sorted(p.name for p in (model_dir / "onnx-pruned").glob("*.onnx")) == ["text.onnx", "vision.onnx"]
    assert artifact["parent"] == "hf-pruned"
    assert artifact["verification"]["passed"] is True


@pytest.mark.parametrize("tower", TOWERS["clip"])
def test_onnx_of_the_pruned_checkpoint_multiplies_by_the_smaller_mlp_weights(tower: str, pipeline: tuple[Path, dict[str, Any]]) -> None:
    shapes = _weight_matmul_shapes(onnx.load(pipeline[0] / "onnx-pruned" / f"{tower}.onnx"))

    assert shapes[(HIDDEN, MLP_KEPT)] == 2 and shapes[(MLP_KEPT, HIDDEN)] == 2, shapes
    assert not any(MLP in shape for shape in shapes), shapes


def test_onnx_of_the_pruned_checkpoint_quantizes_to_int8_dynamic(pipeline: tuple[Path, dict[str, Any]]) -> None:
    model_dir, _ = pipeline
    artifact = manifest(model_dir)["artifacts"]["int8-pruned"]

    assert (artifact["parent"], artifact["traits"]["precision"]) == ("onnx-pruned", "int8-dynamic")
    assert artifact["verification"]["passed"] is True
    for tower in TOWERS["clip"]:
        assert any(n.op_type == "MatMulInteger" for n in onnx.load(model_dir / "int8-pruned" / f"{tower}.onnx").graph.node), tower


def test_bench_runs_the_onnx_of_the_pruned_checkpoint(pipeline: tuple[Path, dict[str, Any]]) -> None:
    rows = [r for r in pipeline[1]["rows"] if r["artifact"] == "onnx-pruned"]

    assert sorted(r["tower"] for r in rows) == sorted(TOWERS["clip"])
    assert all(r["backend"] == "onnxruntime" and r["latency_ms"]["mean"] > 0 for r in rows)


def test_head_pruned_vit_converts_with_whole_heads_removed_from_the_attention_matmuls(
    structured: Callable[[str], tuple[Path, dict[str, Any]]], copy_model_dir: Callable[[Path], Path]
) -> None:
    model_dir = copy_model_dir(structured("vit")[0])

    vlmopt_json("convert", model_dir, "--from", "hf-pruned", "--name", "onnx-pruned")

    shapes = _weight_matmul_shapes(onnx.load(model_dir / "onnx-pruned" / "vision.onnx"))
    assert shapes[(HIDDEN, HEADS_KEPT * HEAD_DIM)] == 3 * 2 and shapes[(HEADS_KEPT * HEAD_DIM, HIDDEN)] == 2, shapes
    assert shapes[(HIDDEN, MLP_KEPT)] == 2 and shapes[(MLP_KEPT, HIDDEN)] == 2, shapes


# -- sparsity: 2:4, per layer and global, zeros made permanent ------------------------------------
SPARSE = {
    "hf-2-4": ("--pattern", "2:4"),
    "hf-sparse-layer": ("--sparsity", 0.4),
    "hf-sparse-global": ("--sparsity", 0.4, "--scope", "global"),
}


@pytest.fixture(scope="module")
def sparse(tmp_path_factory: pytest.TempPathFactory, exported: Callable[[str], Path]) -> tuple[Path, dict[str, dict[str, Any]]]:
    """(the tiny CLIP with one artifact per SPARSE entry, the artifact per name as --json reported it)."""
    model_dir = tmp_path_factory.mktemp("sparse") / "clip"
    shutil.copytree(exported("clip"), model_dir)
    return model_dir, {name: vlmopt_json("prune", model_dir, *flags, "--name", name)["artifact"] for name, flags in SPARSE.items()}


def _sparse_linears(model_dir: Path, artifact: str, tower: str | None = None) -> dict[str, np.ndarray]:
    weights = _weights(model_dir, artifact)
    chosen = {k: v for k, v in weights.items() if CLIP_LINEAR.match(k) and (tower is None or k.startswith(f"{tower}_model."))}
    assert len(chosen) == (24 if tower is None else 12)
    return chosen


def test_two_four_leaves_at_most_two_non_zeros_in_every_group_of_four_inputs_of_every_linear(sparse: tuple[Path, dict[str, dict[str, Any]]]) -> None:
    for key, weight in _sparse_linears(sparse[0], "hf-2-4").items():
        rows, columns = weight.shape
        assert columns % 4 == 0, key
        non_zeros = (weight.reshape(rows, columns // 4, 4) != 0).sum(axis=-1)
        assert non_zeros.max() <= 2, key
        assert _zero_fraction(weight) == 0.5, key


def test_two_four_keeps_the_two_largest_weights_of_each_group_unchanged(sparse: tuple[Path, dict[str, dict[str, Any]]]) -> None:
    model_dir, _ = sparse
    original = _weights(model_dir, "hf")

    for key, weight in _sparse_linears(model_dir, "hf-2-4").items():
        groups = original[key].reshape(weight.shape[0], -1, 4)
        largest = np.argsort(-np.abs(groups), axis=-1, kind="stable")[..., :2]
        expected = np.zeros_like(groups)
        np.put_along_axis(expected, largest, np.take_along_axis(groups, largest, axis=-1), axis=-1)
        np.testing.assert_array_equal(weight, expected.reshape(weight.shape), err_msg=key)


def test_two_four_is_recorded_in_the_manifest(sparse: tuple[Path, dict[str, dict[str, Any]]]) -> None:
    model_dir, artifacts = sparse
    meta = manifest(model_dir)["artifacts"]["hf-2-4"]["traits"]

    assert meta == artifacts["hf-2-4"]["traits"]
    assert meta["two_four_sparse"] is True
    for tower in TOWERS["clip"]:
        assert meta["sparsity"][tower]["pattern"] == "2:4"
        assert meta["sparsity"][tower]["target"] == 0.5
        assert meta["sparsity"][tower]["achieved"] == pytest.approx(0.5)
        assert meta["sparsity"][tower]["layers"] == 12


@pytest.mark.parametrize("name", list(SPARSE))
def test_sparsity_writes_real_zeros_and_no_mask_tensors(name: str, sparse: tuple[Path, dict[str, dict[str, Any]]]) -> None:
    """The safetensors holds the same tensors of the same shapes as the parent; only the pruned Linears' weights changed."""
    model_dir, _ = sparse
    original, pruned = _weights(model_dir, "hf"), _weights(model_dir, name)

    assert {k: v.shape for k, v in pruned.items()} == {k: v.shape for k, v in original.items()}
    for key in original:
        if CLIP_LINEAR.match(key):
            survivors = pruned[key] != 0
            np.testing.assert_array_equal(pruned[key][survivors], original[key][survivors], err_msg=key)
        else:
            np.testing.assert_array_equal(pruned[key], original[key], err_msg=key)


@pytest.mark.parametrize("name", list(SPARSE))
def test_sparsity_keeps_the_shapes_in_the_config(name: str, sparse: tuple[Path, dict[str, dict[str, Any]]]) -> None:
    config = _config(sparse[0], name)

    for sub in ("vision_config", "text_config"):
        assert (config[sub]["intermediate_size"], config[sub]["num_attention_heads"]) == (MLP, HEADS)


def test_per_layer_sparsity_zeroes_the_target_fraction_of_every_linear(sparse: tuple[Path, dict[str, dict[str, Any]]]) -> None:
    fractions = {key: _zero_fraction(weight) for key, weight in _sparse_linears(sparse[0], "hf-sparse-layer").items()}

    assert fractions == pytest.approx(dict.fromkeys(fractions, 0.4), abs=0.005)


def test_per_layer_sparsity_zeroes_the_smallest_weights_of_each_linear(sparse: tuple[Path, dict[str, dict[str, Any]]]) -> None:
    model_dir, _ = sparse
    original = _weights(model_dir, "hf")

    for key, weight in _sparse_linears(model_dir, "hf-sparse-layer").items():
        magnitudes = np.abs(original[key])
        assert magnitudes[weight == 0].max() <= magnitudes[weight != 0].min(), key


@pytest.mark.parametrize("tower", TOWERS["clip"])
def test_global_sparsity_reaches_the_target_over_a_tower_with_uneven_layers(tower: str, sparse: tuple[Path, dict[str, dict[str, Any]]]) -> None:
    linears = _sparse_linears(sparse[0], "hf-sparse-global", tower)
    zeros = sum(int((w == 0).sum()) for w in linears.values())
    total = sum(w.size for w in linears.values())
    fractions = [_zero_fraction(w) for w in linears.values()]

    assert zeros / total == pytest.approx(0.4, abs=0.005)
    assert max(fractions) - min(fractions) > 0.05, fractions


@pytest.mark.parametrize("tower", TOWERS["clip"])
def test_global_sparsity_uses_one_magnitude_threshold_over_the_tower(tower: str, sparse: tuple[Path, dict[str, dict[str, Any]]]) -> None:
    model_dir, _ = sparse
    original = _weights(model_dir, "hf")
    linears = _sparse_linears(model_dir, "hf-sparse-global", tower)

    zeroed = np.concatenate([np.abs(original[k])[w == 0] for k, w in linears.items()])
    kept = np.concatenate([np.abs(original[k])[w != 0] for k, w in linears.items()])
    assert zeroed.max() <= kept.min()


@pytest.mark.parametrize(("name", "scope"), [("hf-sparse-layer", "layer"), ("hf-sparse-global", "global")])
def test_unstructured_sparsity_is_recorded_with_its_target_and_what_it_achieved(name: str, scope: str, sparse: tuple[Path, dict[str, dict[str, Any]]]) -> None:
    model_dir, artifacts = sparse
    meta = artifacts[name]["traits"]

    assert meta["two_four_sparse"] is False
    for tower in TOWERS["clip"]:
        recorded = meta["sparsity"][tower]
        linears = _sparse_linears(model_dir, name, tower)
        measured = sum(int((w == 0).sum()) for w in linears.values()) / sum(w.size for w in linears.values())
        assert (recorded["pattern"], recorded["scope"], recorded["target"], recorded["layers"]) == ("unstructured", scope, 0.4, 12)
        assert recorded["achieved"] == pytest.approx(measured)
        assert artifacts[name]["record"]["towers"][tower]["sparsity"] == recorded


# -- the accuracy gate ----------------------------------------------------------------------------
def test_min_cosine_gate_fails_with_exit_1_and_leaves_the_directory_unchanged(exported: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(exported("clip"))
    before = snapshot(model_dir)

    result = vlmopt("prune", model_dir, "--mlp-ratio", 0.5, "--min-cosine", 0.9999999)

    assert result.exit_code == 1, result.output
    assert "check failed" in result.stderr
    assert "Traceback" not in result.output
    assert snapshot(model_dir) == before
    assert leftovers(model_dir) == []
    assert "hf-pruned" not in manifest(model_dir)["artifacts"]


def test_min_cosine_gate_failure_is_reported_in_json(exported: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(exported("vit"))

    result = vlmopt("prune", model_dir, "--mlp-ratio", 0.5, "--min-cosine", 0.9999999, "--json")

    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert (report["ok"], report["exit_code"]) == (False, 1)
    assert not (model_dir / "hf-pruned").exists()


def test_min_cosine_that_is_met_is_recorded_and_the_artifact_written(exported: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(exported("vit"))

    artifact = vlmopt_json("prune", model_dir, "--mlp-ratio", MLP_RATIO, "--min-cosine", 0.5)["artifact"]

    assert artifact["verification"]["gates"]["min_cosine"] == 0.5
    assert artifact["verification"]["passed"] is True
    assert (model_dir / "hf-pruned" / "model.safetensors").is_file()
