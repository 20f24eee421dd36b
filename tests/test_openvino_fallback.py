"""`vlmopt openvino --mode int8` and its fallback (on by default): the fewest most sensitive layers of an NNCF int8
model kept in float (NNCF's ignored scope) until the cosine gate passes on rows the search did not see, the model
measured is the model shipped, and the manifest records what was kept, the fidelity reached and what it costs.

The tiny random-weight CLIP calibrated on 8 samples of the built-in photos and prose misses a gate it can be made to
meet by keeping a few layers. How far fully int8 falls depends on the CPU's int8 kernels (cosine min 0.97 on an AVX2
machine, 0.9955 with AVX-512 VNNI), so the gate is set from the strict variant measured first on this machine: a
third of the way from its worst tower's cosine to 1, which the fallback must win back."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import assert_refused, leftovers, snapshot, vlmopt, vlmopt_json

if importlib.util.find_spec("openvino") is None or importlib.util.find_spec("nncf") is None:
    if os.environ.get("CI"):
        raise ImportError("CI installs the openvino extra (make install); its tests must run there, not skip")
    pytest.skip("the openvino extra is not installed here (pip install -e '.[openvino]')", allow_module_level=True)

import openvino as ov  # noqa: E402

from vlmopt.quantization.openvino_fallback import FakeQuantizeProbe, sensitivity  # noqa: E402

INT8 = ("--mode", "int8", "--calib-samples", "8")


@pytest.fixture(scope="module")
def fell_back(tmp_path_factory: pytest.TempPathFactory, converted: Callable[[str], Path]) -> tuple[Path, dict[str, Any], float]:
    """(model directory, artifact, gate) of the tiny CLIP in NNCF int8 with --fallback, gated a third of the way from
    the fully int8 variant's worst cosine to 1."""
    model_dir = tmp_path_factory.mktemp("ov-fallback") / "clip"
    shutil.copytree(converted("clip"), model_dir)
    strict = vlmopt_json("openvino", model_dir, *INT8, "--no-fallback", "--min-cosine", "0", "--name", "strict")["artifact"]
    worst = min(_gated_cosines(strict).values())
    gate = round(worst + (1 - worst) / 3, 6)
    made = vlmopt_json("openvino", model_dir, *INT8, "--min-cosine", str(gate), "--fallback-budget", "0.9", "--name", "fb")["artifact"]
    return model_dir, made, gate


def _gated_cosines(artifact: dict[str, Any]) -> dict[str, float]:
    return {
        tower: min(o["cosine_min"] for c in checks if c["gated"] for o in c["outputs"].values()) for tower, checks in artifact["verification"]["towers"].items()
    }


def test_fallback_keeps_layers_in_float_until_the_gate_passes(fell_back: tuple[Path, dict[str, Any], float]) -> None:
    _, artifact, gate = fell_back
    record = artifact["record"]["fallback"]["towers"]
    needed = [tower for tower, info in record.items() if info["needed"]]

    assert needed
    for tower in needed:
        assert min(record[tower]["fully_quantized"].values()) < gate <= min(record[tower]["reached"].values())
        assert 0 < len(record[tower]["kept"]) < record[tower]["quantized_layers"]
    assert min(_gated_cosines(artifact).values()) >= gate
    assert artifact["verification"]["passed"] is True


def test_the_shipped_ir_has_exactly_the_kept_layers_in_float(fell_back: tuple[Path, dict[str, Any], float]) -> None:
    model_dir, artifact, _ = fell_back

    for tower, info in artifact["record"]["fallback"]["towers"].items():
        if not info["needed"]:
            continue
        kept = {k["node"] for k in info["kept"]}
        still_int8 = set(FakeQuantizeProbe(ov.Core().read_model(model_dir / "fb" / f"{tower}.xml")).candidates)
        assert kept and not kept & still_int8
        assert len(still_int8) == info["quantized_layers"] - len(kept)


def test_fallback_records_the_ranking_the_search_and_the_cost_of_the_kept_layers(fell_back: tuple[Path, dict[str, Any], float]) -> None:
    _, artifact, _ = fell_back
    info = next(info for info in artifact["record"]["fallback"]["towers"].values() if info["needed"])

    scores = [row["sensitivity"] for row in info["top_sensitive"]]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0
    assert sum(r["evaluations"] for r in info["rounds"]) >= 1
    assert info["rounds"][0]["steps"][0] == [0, round(info["fully_quantized"]["search"], 6)]
    assert info["speed"]["total_quantized_ms"] > 0 and info["speed"]["total_with_fallback_ms"] > 0 and info["speed"]["total_fp32_ms"] > 0


def test_fallback_that_was_not_needed_says_so(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    artifact = vlmopt_json("openvino", copy_model_dir(converted("clip")), *INT8, "--min-cosine", "0.8")["artifact"]

    assert {tower: info["needed"] for tower, info in artifact["record"]["fallback"]["towers"].items()} == {"vision": False, "text": False}


def test_an_unreachable_gate_exits_1_with_the_best_fidelity_and_nothing_written(
    converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]
) -> None:
    model_dir = copy_model_dir(converted("clip"))
    before = snapshot(model_dir)

    result = vlmopt("openvino", model_dir, *INT8, "--min-cosine", "0.99999", "--fallback-budget", "0.08")

    assert result.exit_code == 1, result.output
    best = re.search(r"cannot be reached within a budget of \d+ of \d+ layers kept out of int8 .*; the best cosine min found is ([0-9.]+)", result.stderr)
    assert best is not None, result.stderr
    assert float(best.group(1)) < 0.99999
    assert snapshot(model_dir) == before
    assert leftovers(model_dir) == []


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (("--mode", "int8-weights", "--fallback"), "applies to --mode int8"),
        (("--mode", "int8", "--no-fallback", "--fallback-budget", "0.2"), "--no-fallback"),
        (("--mode", "int8-weights", "--fallback-budget", "0.2"), "--fallback-budget"),
        (("--mode", "int8", "--fallback", "--min-cosine", "off"), "give a threshold"),
        (("--mode", "int8", "--fallback-budget", "1.5"), "must be in [0, 1]"),
        (("--mode", "int8", "--fallback-budget", "-1"), "must be in [0, 1]"),
    ],
)
def test_fallback_options_that_cannot_work_are_refused(flags: tuple[str, ...], fragment: str, converted: Callable[[str], Path]) -> None:
    assert_refused(converted("clip"), "openvino", *flags, fragments=(fragment,))


def test_a_calibration_folder_with_no_readable_image_is_refused(tmp_path: Path, converted: Callable[[str], Path]) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "broken.jpg").write_bytes(b"not a jpeg")

    assert_refused(converted("clip"), "openvino", *INT8, "--calib-images", folder, fragments=("broken.jpg", "cannot be read"))


def test_the_probe_measures_each_layer_on_its_own_float_input(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    """A layer's quantized and float-input outputs differ by its own quantization error only: small but not zero.
    With NNCF's SmoothQuant (0.95): with the default (off) one MatMul of the tiny CLIP's vision tower (layers.1 out_proj)
    exposes an output that differs from the model's own (relative difference 1.0, as attention's activation MatMuls
    do), so the probe ranks it first; a known limit of the probe, to fix in the probe (issue 23's note)."""
    model_dir = copy_model_dir(converted("clip"))
    vlmopt_json("openvino", model_dir, *INT8, "--min-cosine", "off", "--smooth-quant", "0.95")
    core = ov.Core()
    quantized = core.read_model(model_dir / "openvino-int8" / "vision.xml")
    probe = FakeQuantizeProbe(quantized)
    shape = [d.get_length() if d.is_static else 2 for d in quantized.inputs[0].get_partial_shape()]
    feed = {"pixel_values": np.random.default_rng(0).random(shape, dtype=np.float32)}

    ranking = sensitivity(probe, [feed], lambda model: core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}))

    assert sorted(name for name, _ in ranking) == sorted(probe.candidates)
    assert all(0.0 < score < 0.2 for _, score in ranking), ranking
