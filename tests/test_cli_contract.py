"""The command line's contract for CI: usage errors in one line (or one JSON object), exit codes that
--debug does not change, and output into a pipe or onto a full device that fails cleanly."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from conftest import vlmopt, vlmopt_process


# -- usage errors, handled once at the entry point -----------------------------------------------
def test_an_unknown_flag_is_one_error_line_on_stderr_and_exit_2(exported: Callable[[str], Path]) -> None:
    result = vlmopt_process("info", exported("clip"), "--bogus")

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == ["error: No such option: --bogus (see `vlmopt info --help`)"]


def test_an_unknown_flag_with_json_is_one_json_error_object_on_stdout(exported: Callable[[str], Path]) -> None:
    result = vlmopt_process("info", exported("clip"), "--json", "--bogus")

    assert result.returncode == 2
    assert json.loads(result.stdout) == {"ok": False, "error": "No such option: --bogus (see `vlmopt info --help`)", "exit_code": 2}


def test_a_missing_argument_is_one_error_line_naming_it() -> None:
    result = vlmopt_process("export", "-o", "somewhere")

    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("error: Missing argument 'SOURCE'")


def test_a_bad_option_value_with_json_is_one_json_error_object_on_stdout(exported: Callable[[str], Path]) -> None:
    result = vlmopt_process("convert", exported("clip"), "--opset", "eighteen", "--json")

    assert result.returncode == 2
    error = json.loads(result.stdout)
    assert error["ok"] is False and error["exit_code"] == 2
    assert "--opset" in error["error"]


# -- --debug adds a traceback, never another exit code ------------------------------------------------
def test_debug_keeps_the_exit_code_of_bad_input_and_adds_the_traceback(tmp_path: Path) -> None:
    result = vlmopt("info", tmp_path / "missing", "--debug")

    assert result.exit_code == 2
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error:")


def test_debug_keeps_the_exit_code_of_a_failed_check(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("clip"))
    (model_dir / "onnx" / "text.onnx").unlink()

    result = vlmopt("info", model_dir, "--verify", "--debug")

    assert result.exit_code == 1
    assert "Traceback" in result.stderr


# -- a closed or full stdout ------------------------------------------------------------------------
def _with_closed_stdout(*args: object) -> tuple[int, str]:
    """Run vlmopt with its stdout a pipe whose reader has gone (as `| head -1` leaves it once head exits)."""
    process = subprocess.Popen([sys.executable, "-m", "vlmopt", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()
    stderr = process.stderr.read()
    return process.wait(timeout=300), stderr


def test_json_into_a_pipe_closed_early_exits_with_the_commands_code_and_says_nothing(exported: Callable[[str], Path]) -> None:
    code, stderr = _with_closed_stdout("info", exported("clip"), "--json")

    assert (code, stderr) == (0, "")


def test_doctor_into_a_pipe_closed_early_exits_with_the_commands_code_and_says_nothing() -> None:
    code, stderr = _with_closed_stdout("doctor")

    assert (code, stderr) == (0, "")


def test_output_onto_a_full_device_is_exit_2_with_one_line(exported: Callable[[str], Path]) -> None:
    with open("/dev/full", "w") as full:
        result = vlmopt_process("info", exported("clip"), "--json", stdout=full)

    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: cannot write to stdout: No space left on device; free some space and run again"]
