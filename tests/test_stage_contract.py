"""The stage contract: options declared once and meaning the same everywhere, typed records between stages,
tool versions in the up-to-date key, runners as checked context managers, and a layering without cycles."""

from __future__ import annotations

import ast
import dataclasses
import json
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import vlmopt
from conftest import assert_bad_input, manifest, snapshot, vlmopt_json
from conftest import vlmopt as run_cli
from vlmopt import options as opts
from vlmopt.errors import VlmoptError
from vlmopt.runners import OrtRunner
from vlmopt.stages import STAGES
from vlmopt.stages.build import BuildOptions
from vlmopt.stages.quantize import QuantizeOptions
from vlmopt.workspace import MANIFEST_NAME

SRC = Path(__file__).resolve().parent.parent / "src" / "vlmopt"
STAGE_NAMES = [stage.name for stage in STAGES]
#: the stages that open an existing model directory and take its path first
ON_A_DIRECTORY = [s for s in STAGE_NAMES if s != "export"]


# -- options declared once ------------------------------------------------------------------------
@pytest.mark.parametrize("stage", STAGES, ids=STAGE_NAMES)
def test_every_declared_option_is_a_flag_of_the_stage_command(stage: Any) -> None:
    import typer

    from vlmopt.cli import app

    command = typer.main.get_command(app).commands[stage.name]  # type: ignore[attr-defined]
    flags = {flag for param in command.params for flag in (*param.opts, *param.secondary_opts)}

    for declared in opts.declared(stage.Options):
        if not declared.spec.argument:
            assert declared.flag in flags, (stage.name, declared.flag)
            assert declared.negative_flag is None or declared.negative_flag in flags, (stage.name, declared.negative_flag)
    assert {"--threads", "--force", "--json", "--debug"} <= flags


@pytest.mark.parametrize("stage", ON_A_DIRECTORY)
@pytest.mark.parametrize("threads", ["0", "-3"])
def test_threads_below_one_is_refused_the_same_way_by_every_stage(stage: str, threads: str, converted: Callable[[str], Path]) -> None:
    model_dir = converted("clip")
    before = snapshot(model_dir)

    result = run_cli(stage, model_dir, "--threads", threads)

    assert_bad_input(result, f"--threads must be a whole number of at least 1, got {threads}")
    assert snapshot(model_dir) == before


@pytest.mark.parametrize(
    ("stage", "flag", "value"),
    [
        ("bench", "--duration", "nan"),
        ("bench", "--duration", "inf"),
        ("bench", "--min-speedup", "nan"),
        ("quantize", "--percentile", "nan"),
        ("quantize", "--min-cosine", "nan"),
        ("optimize", "--atol", "inf"),
        ("prune", "--mlp-ratio", "nan"),
    ],
)
def test_non_finite_numbers_are_refused_by_every_option(stage: str, flag: str, value: str, converted: Callable[[str], Path]) -> None:
    result = run_cli(stage, converted("clip"), flag, value)

    assert_bad_input(result, flag)


def test_a_recipe_style_mapping_with_an_unknown_option_names_the_known_ones() -> None:
    with pytest.raises(VlmoptError) as raised:
        opts.parse_options(QuantizeOptions, {"mode": "int8-dynamic", "calib_image": "photos"})

    assert "unknown option 'calib_image'" in raised.value.message
    assert "calib_images" in raised.value.message


def test_a_recipe_style_mapping_takes_recipe_keys_and_lists() -> None:
    options = opts.parse_options(QuantizeOptions, {"from": "onnx-opt", "op_types": "MatMul,Gemm", "min_cosine": 0.995})

    assert (options.source, options.op_types, options.min_cosine) == ("onnx-opt", ["MatMul", "Gemm"], 0.995)


@pytest.mark.parametrize("off", ["off", "none", None, False])
def test_every_gate_takes_off(off: object) -> None:
    assert opts.parse_options(QuantizeOptions, {"min_cosine": off}).min_cosine is None


def test_min_cosine_zero_is_a_threshold_like_any_other() -> None:
    assert opts.parse_options(QuantizeOptions, {"min_cosine": 0}).min_cosine == 0.0


def test_the_remake_command_keeps_every_option_that_differs_from_its_default() -> None:
    from vlmopt.stages.build import STAGE as BUILD

    options = opts.parse_options(BuildOptions, {"from": "fp16", "timing_cache": False, "min_cosine": "off", "shapes": ["input_ids:1x8,4x16,8x16"]})

    command = shlex.split(BUILD.command_line("build/clip", options))

    assert command[:3] == ["vlmopt", "build", "build/clip"]
    assert "--no-timing-cache" in command
    assert command[command.index("--min-cosine") + 1] == "off"
    assert command[command.index("--shapes") + 1] == "input_ids:1x8,4x16,8x16"
    assert command[command.index("--name") + 1] == "trt-fp16"
    assert opts.parse_options(BuildOptions, _flags_back(command[3:-1])) == dataclasses.replace(options, name="trt-fp16")


def _flags_back(args: list[str]) -> dict[str, Any]:
    """Flags of a remake command read back by the declarations (the inverse of option_args)."""
    flags = {d.flag: d for d in opts.declared(BuildOptions)}
    negatives = {d.negative_flag: d for d in opts.declared(BuildOptions) if d.negative_flag}
    values: dict[str, Any] = {}
    i = 0
    while i < len(args):
        if args[i] in negatives:
            values[negatives[args[i]].name] = False
            i += 1
            continue
        declared = flags[args[i]]
        if declared.base is bool:
            values[declared.name] = True
            i += 1
            continue
        if declared.is_list:
            values.setdefault(declared.name, []).append(args[i + 1])
        else:
            values[declared.name] = args[i + 1]
        i += 2
    return values


# -- typed records: what an artifact did, and what it inherited -------------------------------------
@pytest.fixture(scope="module")
def int8_of_fused(tmp_path_factory: pytest.TempPathFactory, converted: Callable[[str], Path]) -> dict[str, Any]:
    model_dir = tmp_path_factory.mktemp("typed") / "clip"
    import shutil

    shutil.copytree(converted("clip"), model_dir)
    vlmopt_json("optimize", model_dir)
    return vlmopt_json("quantize", model_dir, "--from", "onnx-opt", "--name", "int8-opt")["artifact"]


def test_an_artifact_made_from_a_fused_graph_does_not_record_the_fusion_as_its_own_work(int8_of_fused: dict[str, Any]) -> None:
    for tower, work in int8_of_fused["record"]["towers"].items():
        assert "fused" not in work, tower
        assert "quantization" in work, tower


def test_an_artifact_made_from_a_fused_graph_says_it_inherited_fused(int8_of_fused: dict[str, Any]) -> None:
    traits = int8_of_fused["traits"]

    assert traits["fused"] is True
    assert "fused" in traits["inherited"]
    assert "precision" not in traits["inherited"]
    assert traits["precision"] == "int8-dynamic"


# -- tool versions key the up-to-date check ----------------------------------------------------------
@pytest.fixture
def made_by_an_older_onnxruntime(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> Path:
    """A converted tiny CLIP with int8-dynamic, whose manifest says onnxruntime 1.0.0 made it."""
    model_dir = copy_model_dir(converted("clip"))
    vlmopt_json("quantize", model_dir)
    data = manifest(model_dir)
    data["artifacts"]["int8-dynamic"]["environment"]["onnxruntime"] = "1.0.0"
    (model_dir / MANIFEST_NAME).write_text(json.dumps(data, indent=2))
    return model_dir


def test_info_shows_an_artifact_made_by_other_tool_versions_as_stale_with_the_reason(made_by_an_older_onnxruntime: Path) -> None:
    statuses = {a["name"]: a["status"] for a in vlmopt_json("info", made_by_an_older_onnxruntime)["artifacts"]}

    assert statuses["int8-dynamic"].startswith("stale: made with onnxruntime 1.0.0 (now ")


def test_a_rerun_after_a_tool_upgrade_remakes_the_artifact(made_by_an_older_onnxruntime: Path) -> None:
    report = vlmopt_json("quantize", made_by_an_older_onnxruntime)

    assert report["skipped"] is False
    assert report["artifact"]["environment"]["onnxruntime"] != "1.0.0"


def test_the_up_to_date_key_of_an_engine_holds_the_tensorrt_version_and_the_gpu() -> None:
    from vlmopt.stages.build import STAGE as BUILD

    assert set(BUILD.environment(BuildOptions())) == {"tensorrt", "gpu"}


# -- the Python API is the CLI's ---------------------------------------------------------------------
def test_the_python_api_makes_the_same_artifact_as_the_cli(converted: Callable[[str], Path], tmp_path: Path) -> None:
    import shutil

    by_cli, by_api = tmp_path / "cli", tmp_path / "api"
    shutil.copytree(converted("clip"), by_cli)
    shutil.copytree(converted("clip"), by_api)

    cli = vlmopt_json("quantize", by_cli, "--mode", "int8-dynamic", "--per-channel")["artifact"]
    api = vlmopt.quantize(by_api, mode="int8-dynamic", per_channel=True)

    assert api.artifact.options == cli["options"]
    assert api.artifact.digest == cli["digest"]
    assert api.artifact.traits.to_json() == cli["traits"]


def test_the_python_api_refuses_bad_options_as_the_cli_does(converted: Callable[[str], Path]) -> None:
    with pytest.raises(VlmoptError, match="--mode must be one of"):
        vlmopt.quantize(converted("clip"), mode="int3")


def test_every_stage_returns_the_same_result_type_bench_included(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("clip"))

    results = [vlmopt.convert(model_dir), vlmopt.bench(model_dir, tower=["vision"], batch=[1], iterations=1, warmup=0)]

    assert {type(r).__name__ for r in results} == {"StageResult"}
    assert results[0].artifact is not None and results[1].report is not None


# -- runners -----------------------------------------------------------------------------------------
def test_a_runner_refuses_a_feed_without_its_inputs(converted: Callable[[str], Path]) -> None:
    with OrtRunner(converted("clip") / "onnx" / "text.onnx") as runner, pytest.raises(VlmoptError) as raised:
        runner.run({"input_ids": np.ones((1, 4), dtype=np.int64)})

    assert "missing attention_mask" in raised.value.message


def test_a_runner_refuses_a_feed_with_inputs_it_does_not_take(converted: Callable[[str], Path]) -> None:
    feed = {"pixel_values": np.zeros((1, 3, 32, 32), dtype=np.float32), "input_ids": np.ones((1, 4), dtype=np.int64)}
    with OrtRunner(converted("clip") / "onnx" / "vision.onnx") as runner, pytest.raises(VlmoptError) as raised:
        runner.run(feed)

    assert "unknown input_ids" in raised.value.message


def test_leaving_a_runner_releases_its_session(converted: Callable[[str], Path]) -> None:
    with OrtRunner(converted("clip") / "onnx" / "vision.onnx") as runner:
        assert runner.session is not None

    assert runner.session is None


# -- layering ----------------------------------------------------------------------------------------
def _import_graph() -> dict[str, set[str]]:
    """vlmopt module -> the vlmopt modules it imports anywhere (top level or inside functions)."""
    modules = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vlmopt"):
                for alias in node.names:
                    found.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names if alias.name.startswith("vlmopt"))
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_vlmopt_has_no_import_cycles() -> None:
    graph = _import_graph()
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dependency in sorted(graph[module]):
            assert state.get(dependency) != "open", " -> ".join([*path, module, dependency])
            if dependency not in state:
                visit(dependency, [*path, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_verification_and_runners_do_not_depend_on_stages() -> None:
    graph = _import_graph()

    for module, dependencies in graph.items():
        if module.startswith(("vlmopt.verification", "vlmopt.runners")):
            assert not {d for d in dependencies if d.startswith("vlmopt.stages")}, module
    assert not (SRC / "stages" / "fidelity.py").exists()
