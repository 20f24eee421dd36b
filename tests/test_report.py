"""`vlmopt report DIR`: a Markdown summary for CI and reviewers, and PNG plots, from what the model directory records."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import vlmopt
from conftest import assert_bad_input, recipe_variant, tensorrt_and_gpu_here, vlmopt_json
from conftest import vlmopt as run_cli
from vlmopt.reporting import pareto_front

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def reported(recipe_workspace: Path, first_run: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """`vlmopt report` of the tiny recipe's model directory, written into its own folder."""
    output = tmp_path_factory.mktemp("report")
    result = run_cli("report", recipe_workspace / "build" / "clip", "--output", output)
    assert result.exit_code == 0, result.output
    return result, output


def test_report_writes_the_summary_and_four_plots(reported: tuple[Any, Path]) -> None:
    _, output = reported

    assert sorted(p.name for p in output.iterdir()) == ["latency.png", "size-vs-fidelity.png", "size-vs-speedup.png", "speedup-vs-fidelity.png", "summary.md"]
    for plot in output.glob("*.png"):
        assert plot.read_bytes()[:8] == PNG and plot.stat().st_size > 10_000


def test_report_plots_are_pictures_of_the_expected_layout(reported: tuple[Any, Path]) -> None:
    from PIL import Image

    _, output = reported
    for name in ("latency.png", "size-vs-fidelity.png", "size-vs-speedup.png", "speedup-vs-fidelity.png"):
        width, height = Image.open(output / name).size
        assert width > 1.8 * height, (name, width, height)  # one panel per tower, side by side


def test_report_prints_markdown_with_every_artifact_its_size_fidelity_and_speedups(reported: tuple[Any, Path]) -> None:
    result, _ = reported
    markdown = result.stdout

    assert markdown.startswith("## vlmopt report: ")
    for artifact in ("`hf`", "`onnx`", "`onnx-opt`", "`int8-dynamic`", "`int8-static`"):
        assert f"| {artifact} |" in markdown
    assert "| `int8-static` | ONNX int8-static | onnx |" in markdown
    assert "### Speed-up against PyTorch" in markdown and "| artifact | vision ×1 | vision ×2 | text ×1 | text ×2 |" in markdown
    assert "vision 0.9" in markdown  # worst cosine per tower


def test_report_shows_benchs_recommendation_per_tower_and_batch(reported: tuple[Any, Path]) -> None:
    markdown = reported[0].stdout

    assert "### Recommended: the fastest artifact that passed its fidelity gate" in markdown
    for tower, batch in (("vision", 1), ("vision", 2), ("text", 1), ("text", 2)):
        assert f"| {tower} | {batch} | " in markdown


def test_report_lists_the_gates_of_the_last_run(reported: tuple[Any, Path]) -> None:
    markdown = reported[0].stdout

    assert "| max_size_mb | `int8-static` | 50 |" in markdown and "✅ passed" in markdown


@pytest.mark.skipif(tensorrt_and_gpu_here(), reason="the build step runs on this machine")
def test_report_says_what_was_skipped_and_why(reported: tuple[Any, Path]) -> None:
    markdown = reported[0].stdout

    assert "Nothing failed" in markdown
    assert "step `trt-onnx` (build): vlmopt build needs TensorRT" in markdown


def test_the_summary_file_shows_the_plots_the_printed_one_names_them(reported: tuple[Any, Path]) -> None:
    result, output = reported

    assert "![Latency against batch](latency.png)" in (output / "summary.md").read_text()
    assert "- Latency against batch: `latency.png`" in result.stdout


def test_report_writes_into_the_model_directorys_reports_by_default(recipe_workspace: Path, model_dir_copy: Callable[[str], Path]) -> None:
    model_dir = model_dir_copy("clip-report")

    payload = vlmopt_json("report", model_dir)

    assert payload["summary"] == str(model_dir / "reports" / "summary.md")
    assert set(payload["plots"]) == {"latency", "fidelity", "speedup", "tradeoff"}
    assert all(Path(p).is_file() for p in payload["files"])


def test_report_names_a_failed_gate_under_what_failed(recipe_workspace: Path, model_dir_copy: Callable[[str], Path]) -> None:
    model_dir_copy("clip-failed")
    recipe = recipe_variant(recipe_workspace, "failed.yaml", "clip-failed", ("max_size_mb: {int8-static: 50}", "max_size_mb: {int8-static: 0.001}"))
    assert run_cli("run", recipe).exit_code == 1

    markdown = vlmopt.report(recipe_workspace / "build" / "clip-failed").markdown

    assert "### ❌ What failed" in markdown
    assert "- gate max_size_mb int8-static: 0.3 MB > 0.001 MB" in markdown


def test_report_names_an_artifact_whose_files_changed(recipe_workspace: Path, model_dir_copy: Callable[[str], Path]) -> None:
    model_dir = model_dir_copy("clip-modified")
    with open(model_dir / "int8-dynamic" / "vision.onnx", "ab") as fh:
        fh.write(b"\0")

    markdown = vlmopt.report(model_dir).markdown

    assert "artifact `int8-dynamic`: modified: vision.onnx changed size" in markdown


def test_report_of_a_directory_never_benchmarked_says_so_and_draws_nothing(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("clip"))

    payload = vlmopt_json("report", model_dir)

    assert payload["plots"] == {} and payload["bench_report"] is None
    assert f"No bench report yet: `vlmopt bench {model_dir}`" in payload["markdown"]


def test_report_of_a_folder_that_is_not_a_model_directory_is_bad_input(tmp_path: Path) -> None:
    assert_bad_input(run_cli("report", tmp_path), "is not a vlmopt model directory")


def test_report_json_is_one_object(reported: tuple[Any, Path], recipe_workspace: Path, tmp_path: Path) -> None:
    result = run_cli("report", recipe_workspace / "build" / "clip", "--output", tmp_path, "--json")

    payload = json.loads(result.stdout)
    assert payload["ok"] is True and payload["failures"] == []
    assert {a["name"] for a in payload["artifacts"]} == {"hf", "onnx", "onnx-opt", "int8-dynamic", "int8-static"}


# -- the Pareto front -----------------------------------------------------------------------------
def test_the_pareto_front_keeps_what_nothing_smaller_beats() -> None:
    points = [(100.0, 0.9), (50.0, 0.8), (60.0, 0.95), (120.0, 0.99), (70.0, 0.7)]

    assert pareto_front(points, maximize=True) == [1, 2, 3]


def test_the_pareto_front_for_a_quantity_to_minimize() -> None:
    points = [(100.0, 1e-6), (50.0, 1e-3), (60.0, 1e-2), (120.0, 1e-7)]

    assert pareto_front(points, maximize=False) == [1, 0, 3]


def test_copied_reports_still_find_their_bench_report(recipe_workspace: Path, first_run: dict[str, Any], tmp_path: Path) -> None:
    copy = tmp_path / "moved"
    shutil.copytree(recipe_workspace / "build" / "clip", copy)

    assert vlmopt.report(copy).bench_report is not None
