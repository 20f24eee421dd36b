"""No artifact is lost at any kill point: a command stopped right after any step of its commit leaves
the directory, once `info --verify` or a re-run has settled it, exactly as it was before the command
or exactly as the command leaves it, with every artifact ok. Nor does a concurrent run refused the
lock touch the work of the one holding it.

tests/killpoints.py runs each case once per commit step (one process, forked per run, so that torch
is imported once); the tests below read its results.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vlmopt.demo import build_demo_model

DRIVER = Path(__file__).with_name("killpoints.py")
INFO_SETTLES_THEN_RERUN = ["info", "rerun"]


def _case(name: str, command: list[str], before: Path | None, mode: str, settle: list[str]) -> dict[str, Any]:
    return {"id": name, "command": command, "before": str(before) if before else None, "mode": mode, "settle": settle}


@pytest.fixture(scope="module")
def kill_points(
    tmp_path_factory: pytest.TempPathFactory, exported: Callable[[str], Path], converted: Callable[[str], Path], demo_source: Callable[[str], Path]
) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("kill-points")
    retrained = build_demo_model(root / "vit-seed1", "vit", "tiny", seed=1)
    replace_before, new_before = root / "replace-before", root / "new-before"
    shutil.copytree(exported("vit"), replace_before)
    shutil.copytree(converted("vit"), new_before)
    replace = ["export", str(retrained), "-o", "{work}"]  # changed weights: the recorded `hf` is replaced
    quantize = ["quantize", "{work}", "--mode", "int8-dynamic"]  # a first quantization: a new artifact
    export_new = ["export", str(demo_source("vit")), "-o", "{work}"]  # the first export into a folder that does not exist yet
    cases = [
        _case("replace-kill", replace, replace_before, "kill", INFO_SETTLES_THEN_RERUN),
        _case("replace-interrupt", replace, replace_before, "interrupt", ["info"]),
        _case("new-kill", quantize, new_before, "kill", INFO_SETTLES_THEN_RERUN),
        _case("new-interrupt", quantize, new_before, "interrupt", ["info"]),
        _case("new-folder-kill", export_new, None, "kill", ["rerun", "info"]),
        # two exports into the same new folder, the one refused the lock going on while the other is about to commit
        {**_case("race", export_new, None, "kill", []), "race": True},
    ]
    for case in cases:
        case["work"] = str(root / "work" / case["id"])
    plan, result = root / "plan.json", root / "result.json"
    plan.write_text(json.dumps({"logs": str(root / "logs"), "cases": cases}))
    done = subprocess.run([sys.executable, str(DRIVER), str(plan), str(result)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(result.read_text())


def _completed(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """The state the command leaves when nothing stops it (its last run, which ran to the end)."""
    last = steps[-1]
    assert last["call"] is None and last["exit"] == 0, last["log"]
    return last["after_stop"]


def _where(step: dict[str, Any]) -> str:
    return f"stopped after step {step['step']}, {step['call']}; its output: {step['log'][-600:]}"


@pytest.mark.parametrize("case", ["replace-kill", "new-kill"])
def test_info_verify_after_a_kill_at_any_commit_step_finds_the_old_or_the_new_state(kill_points: dict[str, Any], case: str) -> None:
    before, steps = kill_points[case]["before"], kill_points[case]["steps"]
    after = _completed(steps)
    assert after != before

    for step in steps:
        info = step["settled"][0]
        assert info["exit"] == 0, _where(step) + info["output"]
        assert info["state"] in (before, after), _where(step)
    assert all(step["exit"] == -signal.SIGKILL for step in steps[:-1])
    assert len(steps) > 10, "every commit step, from the staging folder to the journal's removal, is a kill point"


@pytest.mark.parametrize("case", ["replace-kill", "new-kill"])
def test_a_rerun_after_a_kill_at_any_commit_step_completes_the_command(kill_points: dict[str, Any], case: str) -> None:
    steps = kill_points[case]["steps"]
    after = _completed(steps)

    for step in steps:
        rerun = step["settled"][1]
        assert rerun["exit"] == 0, _where(step) + rerun["output"]
        assert rerun["state"] == after, _where(step)


@pytest.mark.parametrize("case", ["replace-interrupt", "new-interrupt"])
def test_ctrl_c_at_any_commit_step_leaves_the_old_or_the_new_state_and_says_which(kill_points: dict[str, Any], case: str) -> None:
    before, steps = kill_points[case]["before"], kill_points[case]["steps"]
    after = _completed(steps)

    for step in steps[:-1]:
        assert step["exit"] == 130, _where(step)
        assert step["after_stop"] in (before, after), _where(step)
        if step["after_stop"] == before:
            assert "nothing was committed" in step["log"], _where(step)
        else:
            assert "nothing was committed" not in step["log"], _where(step)
        assert step["settled"][0]["exit"] == 0, _where(step) + step["settled"][0]["output"]


def test_an_export_into_a_new_folder_killed_at_any_step_is_retried_without_clean_up_by_hand(kill_points: dict[str, Any]) -> None:
    steps = kill_points["new-folder-kill"]["steps"]
    after = _completed(steps)

    for step in steps[:-1]:
        rerun, info = step["settled"][0], step["settled"][1]
        assert rerun["exit"] == 0, _where(step) + rerun["output"]
        assert info["exit"] == 0 and info["state"] == after, _where(step)


def test_an_export_refused_the_lock_leaves_the_work_of_the_one_holding_it_alone(kill_points: dict[str, Any]) -> None:
    race = kill_points["race"]

    assert race["second"]["exit"] == 2 and "in use by another vlmopt process" in race["second"]["output"], race["second"]["output"]
    assert race["first"]["exit"] == 0, race["first"]["output"]
    assert race["info"]["exit"] == 0, race["info"]["output"]


@pytest.mark.parametrize(("case", "artifact"), [("replace-kill", "hf"), ("new-kill", "int8-dynamic")])
def test_every_file_and_folder_is_on_disk_before_the_manifest_names_it(kill_points: dict[str, Any], case: str, artifact: str) -> None:
    steps = kill_points[case]["steps"]
    calls = [step["call"] for step in steps[:-1]]  # the command's Nth commit primitive, for every N: its whole trace
    moved_in = calls.index(next(c for c in calls if c.startswith("replace(.tmp-") and c.endswith(f", {artifact})")))
    committed = calls.index(next(c for c in calls if c.startswith("replace(.tmp-") and c.endswith(", vlmopt.json)")))

    for record in _completed(steps)["vlmopt.json"]["artifacts"][artifact]["files"]:
        assert f"fsync({Path(record['path']).name})" in calls[:moved_in], f"{record['path']} is not fsynced before it is moved into place: {calls}"
    assert any(c.startswith(f"fsync(.tmp-{artifact}-") for c in calls[:moved_in]), f"the staging folder is not fsynced: {calls}"
    assert f"fsync({case})" in calls[moved_in:committed], f"the directory is not fsynced between the folder's rename and the manifest's: {calls}"
