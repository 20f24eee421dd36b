"""Recipes are checked whole before any step runs: every bad input is one line naming file:line, exit 2, and nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import EXAMPLES, assert_bad_input, snapshot, vlmopt, write_recipe
from vlmopt.errors import VlmoptError
from vlmopt.recipe import load_recipe

HEAD = "source: demo:clip-tiny\nmodel_dir: out\n"


def refused(tmp_path: Path, text: str, *fragments: str) -> None:
    """`vlmopt run` of this recipe text: exit 2, one line holding every fragment, and the folder exactly as it was."""
    recipe = write_recipe(tmp_path, text)
    before = snapshot(tmp_path)

    result = vlmopt("run", recipe)

    assert_bad_input(result, *fragments)
    assert snapshot(tmp_path) == before


def test_a_recipe_that_is_not_yaml_is_refused_with_its_line(tmp_path: Path) -> None:
    refused(tmp_path, HEAD + "steps: [convert: {}\n", "recipe.yaml:4: not valid YAML")


def test_yaml_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    refused(tmp_path, "- convert\n- optimize\n", "recipe.yaml:1: a recipe is a mapping", "not a list")


def test_an_empty_recipe_is_refused(tmp_path: Path) -> None:
    refused(tmp_path, "# nothing yet\n", "recipe.yaml: the recipe is empty")


def test_a_misspelled_stage_names_the_file_line_and_the_stages(tmp_path: Path) -> None:
    refused(
        tmp_path,
        HEAD + "steps:\n  - convert: {}\n  - quantise: {mode: fp16}\n",
        "recipe.yaml:5: unknown stage 'quantise'",
        "did you mean 'quantize'",
        "optimize",
    )


def test_a_misspelled_option_names_the_file_line_and_the_options(tmp_path: Path) -> None:
    text = HEAD + "steps:\n  - convert: {}\n  - quantize:\n      mode: int8-static\n      calib_image: photos\n"

    refused(tmp_path, text, "recipe.yaml:7: quantize: unknown option 'calib_image'", "did you mean 'calib_images'", "calib_method")


def test_an_option_of_the_wrong_type_names_its_key_and_line(tmp_path: Path) -> None:
    refused(tmp_path, HEAD + "steps:\n  - convert:\n      opset: eighteen\n", "recipe.yaml:5: convert: 'opset' takes a whole number, got 'eighteen'")


def test_an_option_outside_its_range_is_refused(tmp_path: Path) -> None:
    text = HEAD + "steps:\n  - convert: {}\n  - quantize: {mode: fp16, min_cosine: 1.5}\n"

    refused(tmp_path, text, "recipe.yaml:5: quantize: 'min_cosine' must be in [0, 1], got 1.5")


def test_an_option_given_twice_is_refused(tmp_path: Path) -> None:
    refused(tmp_path, HEAD + "steps:\n  - convert: {}\n  - quantize: {mode: fp16, mode: int4}\n", "recipe.yaml:5", "'mode' is given twice")


def test_a_rule_between_options_is_checked_before_anything_runs(tmp_path: Path) -> None:
    text = HEAD + "steps:\n  - convert: {}\n  - quantize: {mode: int8-dynamic, calib_method: entropy}\n"

    refused(tmp_path, text, "recipe.yaml:5: quantize:", "calibrate int8-static")


def test_a_from_that_no_earlier_step_makes_is_refused(tmp_path: Path) -> None:
    text = HEAD + "steps:\n  - convert: {}\n  - quantize: {mode: fp16, from: onnx-opt}\n  - optimize: {}\n"

    refused(tmp_path, text, "recipe.yaml:5: quantize: from 'onnx-opt': no earlier step makes it", "earlier steps make: hf, onnx")


def test_a_default_from_that_nothing_makes_is_refused(tmp_path: Path) -> None:
    refused(tmp_path, HEAD + "steps:\n  - quantize: {mode: fp16}\n", "recipe.yaml:4: quantize: reads 'onnx' (its default `from`)", "no earlier step makes it")


def test_a_from_of_a_kind_the_stage_cannot_read_is_refused(tmp_path: Path) -> None:
    refused(tmp_path, HEAD + "steps:\n  - convert: {}\n  - prune: {from: onnx, mlp_ratio: 0.2}\n", "recipe.yaml:5: prune: from 'onnx'", "Hugging Face")


def test_a_gate_on_an_artifact_no_step_makes_is_refused(tmp_path: Path) -> None:
    text = HEAD + "steps:\n  - convert: {}\n  - quantize: {mode: fp16}\ngates:\n  max_size_mb:\n    int8-static: 100\n"

    refused(tmp_path, text, "recipe.yaml:8: gates: max_size_mb: no step makes 'int8-static'", "steps make: hf, onnx, fp16")


def test_an_unknown_gate_is_refused(tmp_path: Path) -> None:
    refused(
        tmp_path, HEAD + "steps: [convert: {}]\ngates:\n  max_latency_ms: {onnx: 3}\n", "recipe.yaml:5: gates: unknown gate 'max_latency_ms'", "min_speedup"
    )


def test_a_speedup_gate_without_a_bench_step_is_refused(tmp_path: Path) -> None:
    refused(tmp_path, HEAD + "steps: [convert: {}]\ngates:\n  min_speedup: {onnx: 2}\n", "recipe.yaml:5", "no bench step measures 'onnx'")


def test_a_gate_that_is_not_a_number_is_refused(tmp_path: Path) -> None:
    refused(tmp_path, HEAD + "steps: [convert: {}]\ngates:\n  max_size_mb: {onnx: big}\n", "recipe.yaml:5: gates: max_size_mb: onnx takes a number")


def test_an_unknown_top_level_key_is_refused(tmp_path: Path) -> None:
    refused(tmp_path, HEAD + "stepz:\n  - convert: {}\n", "recipe.yaml:3: unknown key 'stepz'", "did you mean 'steps'")


def test_a_step_that_is_not_one_stage_is_refused(tmp_path: Path) -> None:
    refused(tmp_path, HEAD + "steps:\n  - {convert: {}, optimize: {}}\n", "recipe.yaml:4: step 1 must be one stage with its options")


def test_two_steps_making_the_same_artifact_are_refused(tmp_path: Path) -> None:
    text = HEAD + "steps:\n  - convert: {}\n  - quantize: {mode: fp16}\n  - quantize: {mode: fp16, min_cosine: 0.9}\n"

    refused(tmp_path, text, "recipe.yaml:6: quantize makes 'fp16', which step 2 already makes", "different `name`")


def test_an_artifact_name_a_model_directory_cannot_hold_is_refused(tmp_path: Path) -> None:
    refused(tmp_path, HEAD + "steps:\n  - convert: {name: reports}\n", "recipe.yaml:4: convert: 'reports' cannot name an artifact")


def test_a_calibration_folder_that_does_not_exist_is_refused_relative_to_the_recipe(tmp_path: Path) -> None:
    text = HEAD + "steps:\n  - convert: {}\n  - quantize: {mode: int8-static, calib_images: photos}\n"

    refused(tmp_path, text, "recipe.yaml:5: quantize: calib_images: photos does not exist", str(tmp_path / "photos"))


def test_an_unknown_demo_family_is_refused(tmp_path: Path) -> None:
    refused(tmp_path, "source: demo:gpt-tiny\nmodel_dir: out\nsteps: [convert: {}]\n", "recipe.yaml:1: source demo:gpt-tiny: no demo family 'gpt'")


def test_a_local_source_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    refused(tmp_path, "source: ./models/clip\nmodel_dir: out\nsteps: [convert: {}]\n", "recipe.yaml:1: source ./models/clip does not exist")


def test_a_recipe_without_source_needs_an_existing_model_directory(tmp_path: Path) -> None:
    refused(tmp_path, "model_dir: out\nsteps: [convert: {}]\n", "the recipe has no source", "holds no model directory")


def test_a_recipe_file_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    assert_bad_input(vlmopt("run", tmp_path / "nope.yaml"), "nope.yaml does not exist")


def test_a_binary_file_is_refused_as_not_yaml(tmp_path: Path) -> None:
    (tmp_path / "recipe.yaml").write_bytes(b"\x00\x01\x02binary")

    assert_bad_input(vlmopt("run", tmp_path / "recipe.yaml"), "not valid YAML")


def test_a_yaml_tag_that_builds_python_objects_is_refused(tmp_path: Path) -> None:
    refused(tmp_path, HEAD + "steps: !!python/object/apply:os.system ['true']\n", "recipe.yaml:3", "not valid YAML")


def test_an_unknown_step_selector_is_refused_before_anything_runs(tmp_path: Path) -> None:
    write_recipe(tmp_path, HEAD + "steps: [convert: {}, quantize: {mode: fp16}]\n")
    before = snapshot(tmp_path)

    result = vlmopt("run", tmp_path / "recipe.yaml", "--only", "int8")

    assert_bad_input(result, "no step 'int8'", "steps: hf, onnx, fp16")
    assert snapshot(tmp_path) == before


# -- what a checked recipe holds ------------------------------------------------------------------
def test_paths_are_relative_to_the_recipes_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "conf" / "calib").mkdir(parents=True)
    recipe = write_recipe(
        tmp_path / "conf", "source: demo:clip-tiny\nmodel_dir: ../build/clip\nsteps:\n  - convert: {}\n  - quantize: {mode: int8-static, calib_images: calib}\n"
    )
    monkeypatch.chdir(tmp_path.parent)

    checked = load_recipe(recipe)

    assert checked.model_dir == tmp_path / "build" / "clip"
    assert checked.steps[2].options.calib_images == str(tmp_path / "conf" / "calib")
    assert checked.demo is not None and checked.demo.folder == tmp_path / "build" / ".vlmopt-demo" / "clip-tiny"


def test_source_implies_an_export_step_that_makes_hf(tmp_path: Path) -> None:
    checked = load_recipe(write_recipe(tmp_path, HEAD + "steps: [convert: {}]\n"))

    assert [(s.number, s.stage.name, s.id) for s in checked.steps] == [(0, "export", "hf"), (1, "convert", "onnx")]


def test_steps_are_named_by_their_artifact_their_stage_or_their_number(tmp_path: Path) -> None:
    checked = load_recipe(write_recipe(tmp_path, HEAD + "steps: [convert: {}, quantize: {mode: fp16}, quantize: {mode: int4}, bench]\n"))

    assert [checked.step(s).id for s in ("int4", "convert", "2", "bench", "export", "hf")] == ["int4", "onnx", "fp16", "bench", "hf", "hf"]


def test_a_stage_that_names_several_steps_is_not_a_selector(tmp_path: Path) -> None:
    checked = load_recipe(write_recipe(tmp_path, HEAD + "steps: [convert: {}, quantize: {mode: fp16}, quantize: {mode: int4}]\n"))

    with pytest.raises(VlmoptError, match="'quantize' names 2 steps"):
        checked.step("quantize")


def test_bench_reads_every_artifact_before_it_and_the_reference(tmp_path: Path) -> None:
    checked = load_recipe(write_recipe(tmp_path, HEAD + "steps: [convert: {}, optimize: {}, quantize: {mode: fp16}, bench: {}]\n"))

    assert checked.step("bench").reads == ["hf", "onnx", "onnx-opt", "fp16"]


@pytest.mark.parametrize("recipe", sorted((EXAMPLES / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_the_shipped_recipes_pass_every_check(recipe: Path, tmp_path: Path) -> None:
    source = yaml.safe_load(recipe.read_text(encoding="utf-8"))["source"]
    if source.startswith(".") and not (recipe.parent / source).is_dir():
        pytest.skip(f"{recipe.name} reads a local checkpoint this machine lacks ({source}; its comment says how to make it)")
    checked = load_recipe(recipe, model_dir=tmp_path / "model")

    assert checked.steps[0].stage.name == "export"
    assert checked.gates
