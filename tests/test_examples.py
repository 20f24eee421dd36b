"""The shipped examples work as written: the Python API example, the recipes, `make demo`, the GitHub Actions workflow."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import EXAMPLES, assert_bad_input, run_json, statuses, tensorrt_and_gpu_here, vlmopt
from vlmopt.recipe import load_recipe

ROOT = EXAMPLES.parent


def test_the_python_api_example_runs(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    result = subprocess.run([sys.executable, str(EXAMPLES / "python_api.py"), str(tmp_path / "example")], capture_output=True, text=True, env=env, timeout=900)

    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"int8-static\s+ran", result.stdout)
    assert "gate min_cosine int8-static" in result.stdout and "regressions: none" in result.stdout


def test_make_demo_runs_the_cpu_recipe_and_reports_its_model_directory() -> None:
    makefile = (ROOT / "Makefile").read_text()
    variables = dict(re.findall(r"^(\w+) \?= (.+)$", makefile, flags=re.MULTILINE))
    demo = re.search(r"^demo:.*\n((?:\t.*\n)+)", makefile, flags=re.MULTILINE).group(1)

    assert "vlmopt run $(RECIPE)" in demo and "vlmopt report $(DEMO)" in demo
    assert variables["RECIPE"] == "examples/recipes/clip-cpu.yaml"
    assert load_recipe(ROOT / variables["RECIPE"]).model_dir == ROOT / variables["DEMO"]


@pytest.mark.skipif(tensorrt_and_gpu_here(), reason="this machine has TensorRT and a GPU")
def test_the_tensorrt_recipe_plans_its_engines_as_skipped_with_the_reason_here(tmp_path: Path) -> None:
    code, payload = run_json(EXAMPLES / "recipes" / "clip-tensorrt.yaml", "--dry-run", "--model-dir", tmp_path / "trt")

    assert code == 0
    assert statuses(payload) == {
        "hf": "will-run",
        "onnx": "will-run",
        "fp16": "will-run",
        "int8-static-trt": "will-run",
        "trt-fp16": "skipped",
        "trt-int8": "skipped",
        "bench": "skipped",
    }
    assert all("TensorRT" in s["reason"] or "GPU" in s["reason"] for s in payload["steps"] if s["status"] == "skipped")
    assert not (tmp_path / "trt").exists()


@pytest.mark.skipif(tensorrt_and_gpu_here(), reason="this machine has TensorRT and a GPU")
def test_the_tensorrt_recipe_fails_with_strict_here(tmp_path: Path) -> None:
    assert_bad_input(
        vlmopt("run", EXAMPLES / "recipes" / "clip-tensorrt.yaml", "--strict", "--dry-run", "--model-dir", tmp_path / "trt"),
        "step trt-fp16 (build)",
        "--strict",
    )


# -- the GitHub Actions workflow ------------------------------------------------------------------
def _workflow_commands() -> list[list[str]]:
    """Every `vlmopt ...` command in the workflow's run steps, as argument lists (shell redirections dropped)."""
    workflow = yaml.safe_load((EXAMPLES / "github-actions.yml").read_text())
    commands = []
    for job in workflow["jobs"].values():
        for step in job["steps"]:
            for line in str(step.get("run", "")).splitlines():
                for match in re.finditer(r"(?:^|\$\(|&&|\||;)\s*vlmopt((?:[ \t]+[^\s|;&>)]+)*)", line):
                    commands.append(["vlmopt", *(word.strip("\"'") for word in match.group(1).split())])
    return commands


def test_the_workflow_is_valid_yaml_with_a_job_that_caches_runs_reports_uploads_and_compares() -> None:
    workflow = yaml.safe_load((EXAMPLES / "github-actions.yml").read_text())
    steps = workflow["jobs"]["artifacts"]["steps"]
    uses = [s.get("uses", "").split("@")[0] for s in steps]
    runs = " ".join(str(s.get("run", "")) for s in steps)

    assert {"actions/cache", "actions/upload-artifact", "actions/download-artifact"} <= set(uses)
    assert 'vlmopt run "$RECIPE"' in runs and '>> "$GITHUB_STEP_SUMMARY"' in runs and "vlmopt compare baseline" in runs


def test_every_vlmopt_command_in_the_workflow_exists_with_its_flags() -> None:
    import typer

    from vlmopt.cli import app

    group = typer.main.get_command(app)
    commands = _workflow_commands()
    assert {c[1] for c in commands if len(c) > 1} >= {"run", "report", "compare"}
    for words in commands:
        if words[1] == "--version":
            continue
        command = group.commands[words[1]]  # type: ignore[attr-defined]
        flags = {flag for param in command.params for flag in (*param.opts, *param.secondary_opts)}
        for word in words[2:]:
            if word.startswith("--"):
                assert word in flags, (words, word)


def test_the_workflow_caches_what_the_recipe_writes() -> None:
    workflow = yaml.safe_load((EXAMPLES / "github-actions.yml").read_text())
    recipe = load_recipe(ROOT / workflow["env"]["RECIPE"])
    cache = next(s for s in workflow["jobs"]["artifacts"]["steps"] if s.get("uses", "").startswith("actions/cache"))

    assert recipe.model_dir == ROOT / workflow["env"]["MODEL_DIR"]
    assert recipe.model_dir.is_relative_to(ROOT / cache["with"]["path"])
    assert recipe.demo is not None and recipe.demo.folder.is_relative_to(ROOT / cache["with"]["path"])
