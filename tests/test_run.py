"""`vlmopt run RECIPE`: steps in order through each stage's own run, make-like reruns, dry runs, selections, gates."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import vlmopt
from conftest import assert_bad_input, recipe_variant, run_json, snapshot, statuses, tensorrt_and_gpu_here, vlmopt_json
from conftest import vlmopt as run_cli

TENSORRT_HERE = tensorrt_and_gpu_here()
needs_no_tensorrt = pytest.mark.skipif(TENSORRT_HERE, reason="this machine has TensorRT and a GPU: the build step runs here")

ALL_UP_TO_DATE = {
    "hf": "up-to-date",
    "onnx": "up-to-date",
    "onnx-opt": "up-to-date",
    "int8-dynamic": "up-to-date",
    "int8-static": "up-to-date",
    "trt-onnx": "skipped",
    "bench": "up-to-date",
}


def bench_reports(model_dir: Path) -> list[str]:
    return sorted(p.name for p in (model_dir / "reports").glob("bench-*.json"))


@pytest.fixture(scope="module")
def second_run(recipe_workspace: Path, first_run: dict[str, Any]) -> tuple[dict[str, Any], float, list[str], float]:
    """The same recipe again: its JSON, its wall time, the bench reports after it, and the demo checkpoint's mtime before it."""
    model_dir = recipe_workspace / "build" / "clip"
    demo_config = recipe_workspace / "build" / ".vlmopt-demo" / "clip-tiny" / "config.json"
    demo_mtime = demo_config.stat().st_mtime
    started = time.perf_counter()
    code, payload = run_json(recipe_workspace / "recipes" / "tiny.yaml")
    elapsed = time.perf_counter() - started
    assert code == 0, payload
    assert demo_config.stat().st_mtime == demo_mtime
    return payload, elapsed, bench_reports(model_dir), demo_mtime


# -- a first and a second run ---------------------------------------------------------------------
@needs_no_tensorrt
def test_a_first_run_makes_every_step_and_skips_the_tensorrt_build_with_the_reason(first_run: dict[str, Any]) -> None:
    assert statuses(first_run) == {**{k: "ran" for k in ALL_UP_TO_DATE}, "trt-onnx": "skipped"}
    build = next(s for s in first_run["steps"] if s["stage"] == "build")
    assert "TensorRT" in build["reason"]


def test_run_json_is_one_object_with_steps_artifacts_and_gates(first_run: dict[str, Any]) -> None:
    int8 = next(s for s in first_run["steps"] if s["id"] == "int8-static")

    assert first_run["ok"] is True and first_run["exit_code"] == 0
    assert int8["artifact"]["kind"] == "onnx" and int8["artifact"]["precision"] == "int8-static"
    assert int8["artifact"]["worst_cosine"] >= 0.99 and int8["seconds"] > 0
    assert [(g["gate"], g["artifact"], g["passed"]) for g in first_run["gates"]] == [
        ("max_size_mb", "int8-static", True),
        ("min_cosine", "int8-static", True),
        ("min_speedup", "int8-dynamic", True),
    ]


def test_a_run_writes_its_outcome_into_the_model_directory(recipe_workspace: Path, first_run: dict[str, Any]) -> None:
    summary = json.loads((recipe_workspace / "build" / "clip" / "reports" / "run.json").read_text())

    assert statuses(summary) == statuses(first_run)


def test_a_second_run_finds_every_step_up_to_date(second_run: tuple[dict[str, Any], float, list[str], float]) -> None:
    payload, _, _, _ = second_run

    assert statuses(payload) == ALL_UP_TO_DATE


def test_a_second_run_takes_seconds_and_neither_rebuilds_the_demo_nor_measures_again(
    recipe_workspace: Path, first_run: dict[str, Any], second_run: tuple[dict[str, Any], float, list[str], float]
) -> None:
    _, elapsed, reports, _ = second_run

    assert elapsed < 20, f"an up-to-date run took {elapsed:.1f} s"
    assert reports == [Path(first_run["steps"][-1]["report"]["file"]).name]


def test_the_python_api_runs_a_recipe_with_the_clis_statuses(recipe_workspace: Path, second_run: tuple[dict[str, Any], float, list[str], float]) -> None:
    result = vlmopt.run(recipe_workspace / "recipes" / "tiny.yaml")

    assert result.ok and {o.step.id: o.status for o in result.steps} == statuses(second_run[0])


# -- one option changed ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def changed_option(recipe_workspace: Path, first_run: dict[str, Any]) -> dict[str, Any]:
    """A copy of the model directory, then the recipe with int8-static's calibration method changed: dry run, then run."""
    import shutil

    shutil.copytree(recipe_workspace / "build" / "clip", recipe_workspace / "build" / "clip-changed")
    recipe = recipe_variant(
        recipe_workspace,
        "changed.yaml",
        "clip-changed",
        ("calib_text: ../data/prompts.txt\n", "calib_text: ../data/prompts.txt\n      calib_method: percentile\n"),
    )
    before = snapshot(recipe_workspace / "build")
    dry = run_cli("run", recipe, "--dry-run")
    after_dry = snapshot(recipe_workspace / "build")
    code, payload = run_json(recipe)
    return {"dry": dry, "unchanged_by_dry_run": before == after_dry, "code": code, "run": payload}


@needs_no_tensorrt
def test_changing_one_option_reruns_exactly_that_step_and_what_reads_it(changed_option: dict[str, Any]) -> None:
    assert changed_option["code"] == 0
    assert statuses(changed_option["run"]) == {**ALL_UP_TO_DATE, "int8-static": "ran", "bench": "ran"}


def test_a_dry_run_says_which_steps_will_run_and_why(changed_option: dict[str, Any]) -> None:
    out = changed_option["dry"].stdout

    assert changed_option["dry"].exit_code == 0
    assert "int8-static (quantize): will run: options changed (calib_method)" in out
    assert "bench: will run: after int8-static" in out
    assert "int8-dynamic (quantize): up to date" in out


def test_a_dry_run_writes_nothing(changed_option: dict[str, Any]) -> None:
    assert changed_option["unchanged_by_dry_run"]


def test_a_dry_run_of_a_new_recipe_plans_everything_and_creates_nothing(recipe_workspace: Path, tmp_path: Path) -> None:
    payload = vlmopt_json("run", recipe_workspace / "recipes" / "tiny.yaml", "--dry-run", "--model-dir", tmp_path / "new" / "clip")

    assert payload["dry_run"] is True
    assert statuses(payload)["onnx"] == "will-run" and statuses(payload)["bench"] == "will-run"
    assert not (tmp_path / "new").exists()


# -- choosing steps -------------------------------------------------------------------------------
def test_only_runs_the_named_step(recipe_workspace: Path, model_dir_copy: Callable[[str], Path]) -> None:
    model_dir_copy("clip-only")
    recipe = recipe_variant(recipe_workspace, "only.yaml", "clip-only")

    code, payload = run_json(recipe, "--only", "int8-dynamic", "--force", "int8-dynamic")

    assert code == 0
    assert {k: v for k, v in statuses(payload).items() if v != "skipped"} == {"int8-dynamic": "ran"}
    assert next(s for s in payload["steps"] if s["id"] == "bench")["reason"] == "not selected (--only int8-dynamic)"


def test_from_step_runs_that_step_and_those_after_it(recipe_workspace: Path, model_dir_copy: Callable[[str], Path]) -> None:
    model_dir_copy("clip-from")
    recipe = recipe_variant(recipe_workspace, "from.yaml", "clip-from")

    code, payload = run_json(recipe, "--from-step", "5", "--force", "bench")

    assert code == 0
    assert [statuses(payload)[k] for k in ("onnx", "int8-static", "bench")] == ["skipped", "skipped", "ran"]


def test_force_remakes_an_up_to_date_step_and_what_reads_it_stays_up_to_date_when_its_content_is_the_same(
    recipe_workspace: Path, model_dir_copy: Callable[[str], Path]
) -> None:
    model_dir_copy("clip-force")
    recipe = recipe_variant(recipe_workspace, "force.yaml", "clip-force")

    code, payload = run_json(recipe, "--force", "onnx-opt")

    assert code == 0
    assert statuses(payload)["onnx-opt"] == "ran"
    assert statuses(payload)["onnx"] == "up-to-date"


@needs_no_tensorrt
def test_strict_fails_on_a_step_this_machine_cannot_run(recipe_workspace: Path, model_dir_copy: Callable[[str], Path]) -> None:
    model_dir_copy("clip-strict")
    recipe = recipe_variant(recipe_workspace, "strict.yaml", "clip-strict")

    result = run_cli("run", recipe, "--strict")

    assert_bad_input(result, "step trt-onnx (build):", "TensorRT", "(--strict)")


@needs_no_tensorrt
def test_a_step_reading_a_skipped_artifact_is_skipped_with_the_reason(recipe_workspace: Path, model_dir_copy: Callable[[str], Path]) -> None:
    model_dir_copy("clip-reads")
    recipe = recipe_variant(
        recipe_workspace,
        "reads.yaml",
        "clip-reads",
        ("  - bench: {batch: [1, 2], iterations: 2, warmup: 0}\n", "  - bench: {artifacts: [trt-onnx], batch: [1]}\n"),
        ("  min_speedup: {int8-dynamic: 0.01}\n", ""),
    )

    code, payload = run_json(recipe)

    bench = next(s for s in payload["steps"] if s["id"] == "bench")
    assert code == 0 and bench["status"] == "skipped"
    assert bench["reason"].startswith("reads 'trt-onnx', which this run does not make (") and "TensorRT" in bench["reason"]


# -- failures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def failed_gate(recipe_workspace: Path, first_run: dict[str, Any]) -> tuple[Any, Path]:
    """The recipe with a size gate its int8-static artifact cannot meet, run on a copy: the CLI's result and the model directory."""
    import shutil

    shutil.copytree(recipe_workspace / "build" / "clip", recipe_workspace / "build" / "clip-gate")
    recipe = recipe_variant(recipe_workspace, "gate.yaml", "clip-gate", ("max_size_mb: {int8-static: 50}", "max_size_mb: {int8-static: 0.001}"))
    return run_cli("run", recipe), recipe_workspace / "build" / "clip-gate"


def test_a_failing_gate_exits_1_naming_it(failed_gate: tuple[Any, Path]) -> None:
    result, _ = failed_gate

    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "check failed: 1 gate(s) failed: max_size_mb int8-static" in result.stderr


def test_a_failing_gate_still_writes_the_runs_summary(failed_gate: tuple[Any, Path]) -> None:
    _, model_dir = failed_gate
    summary = json.loads((model_dir / "reports" / "run.json").read_text())

    assert summary["exit_code"] == 1
    assert [g["passed"] for g in summary["gates"]] == [False, True, True]


def test_a_failing_verification_stops_the_run_with_exit_1(recipe_workspace: Path, model_dir_copy: Callable[[str], Path]) -> None:
    model_dir_copy("clip-verify")
    recipe = recipe_variant(
        recipe_workspace, "verify.yaml", "clip-verify", ("{mode: int8-dynamic, from: onnx-opt}", "{mode: int8-dynamic, from: onnx-opt, min_cosine: 1.0}")
    )

    code, payload = run_json(recipe)

    assert code == 1
    assert statuses(payload)["int8-dynamic"] == "failed"
    assert {statuses(payload)[k] for k in ("int8-static", "trt-onnx", "bench")} == {"skipped"}
    assert next(s for s in payload["steps"] if s["id"] == "bench")["reason"] == "not run: step int8-dynamic (quantize) failed"
    assert payload["error"].startswith("step int8-dynamic (quantize): ") and payload["gates"] == []


def test_a_rerun_after_a_failed_bench_gate_fails_again(recipe_workspace: Path, model_dir_copy: Callable[[str], Path]) -> None:
    model_dir_copy("clip-slow")
    recipe = recipe_variant(
        recipe_workspace,
        "slow.yaml",
        "clip-slow",
        ("{batch: [1, 2], iterations: 2, warmup: 0}", "{batch: [1, 2], iterations: 2, warmup: 0, min_speedup: 100000}"),
    )

    first, _ = run_json(recipe)
    second, payload = run_json(recipe)

    assert (first, second) == (1, 1)
    assert statuses(payload)["bench"] == "failed" and "--min-speedup 100000" in payload["error"]
