"""Errors of the machine, not of vlmopt: read-only folders, full disks, too little memory, a manifest
with wrong types. Each is exit 2 with one line that names what and where, and changes nothing."""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from conftest import assert_bad_input, manifest, snapshot, vlmopt, without_root_override

QUICK_BENCH = ("--batch", "1", "--iterations", "1", "--warmup", "0")


@contextmanager
def read_only(path: Path) -> Iterator[None]:
    mode = path.stat().st_mode
    path.chmod(mode & ~0o222)
    try:
        with without_root_override():
            yield
    finally:
        path.chmod(mode)


# -- read-only ------------------------------------------------------------------------------------
def test_a_read_only_model_directory_is_refused_in_one_line(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("clip"))
    before = snapshot(model_dir)

    with read_only(model_dir):
        result = vlmopt("quantize", model_dir, "--mode", "int8-dynamic")

    assert_bad_input(result, f"cannot write to {model_dir}", "permission denied")
    assert snapshot(model_dir) == before


def test_bench_refuses_a_read_only_reports_folder_before_measuring(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("clip"))
    (model_dir / "reports").mkdir()
    before = snapshot(model_dir)

    with read_only(model_dir / "reports"):
        result = vlmopt("bench", model_dir, "--batch", "1", "--iterations", "200")

    assert_bad_input(result, f"cannot write to {model_dir / 'reports'}", "permission denied")
    assert snapshot(model_dir) == before


def test_a_read_only_lock_file_left_by_another_user_does_not_stop_a_command(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("clip"))
    lock = model_dir / ".vlmopt.lock"
    lock.write_text("4242")
    lock.chmod(0o444)

    with without_root_override():
        result = vlmopt("convert", model_dir, "--json")

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["skipped"] is True


# -- a full disk ----------------------------------------------------------------------------------
@contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writes past `limit` bytes fail (EFBIG), as a full disk makes them fail, without filling one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_bench_report_that_cannot_be_written_leaves_no_partial_file(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("clip"))
    before = snapshot(model_dir)

    with file_size_limit(1024):
        result = vlmopt("bench", model_dir, *QUICK_BENCH)

    assert_bad_input(result, f"cannot write to {model_dir / 'reports'}/bench-", "File too large")
    assert snapshot(model_dir) == before


def _in_a_tiny_file_system(tmp_path: Path, command: str) -> subprocess.CompletedProcess[str]:
    """Run a shell command with a 64 KiB tmpfs mounted at tmp_path/full, in a private mount namespace (needs root)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1)")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("needs the right to make a mount namespace (root)")
    full = tmp_path / "full"
    full.mkdir()
    script = f"mount -t tmpfs -o size=64k tmpfs {full} && {command}"
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], capture_output=True, text=True, timeout=300)


def test_an_export_onto_a_full_disk_is_exit_2_naming_the_directory_and_leaves_nothing(demo_source: Callable[[str], Path], tmp_path: Path) -> None:
    import sys

    target = tmp_path / "full" / "model"
    result = _in_a_tiny_file_system(tmp_path, f"{sys.executable} -m vlmopt export {demo_source('vit')} -o {target}; echo exit=$?; ls -A {target.parent}")

    lines = result.stdout.splitlines()
    assert "exit=2" in lines, result.stdout + result.stderr
    assert lines[lines.index("exit=2") + 1 :] == [], "the new model directory was removed"
    assert result.stderr.splitlines() == [f"error: cannot write to {target}: No space left on device; free some space and run again"]


# -- memory ---------------------------------------------------------------------------------------
def test_a_bench_batch_too_large_for_memory_is_exit_2_saying_what_was_too_large(
    converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]
) -> None:
    model_dir = copy_model_dir(converted("vit"))
    before = snapshot(model_dir)

    result = vlmopt("bench", model_dir, "--batch", "100000000", "--iterations", "1", "--warmup", "0")

    assert_bad_input(result, "not enough memory", "100000000", "--batch")
    assert snapshot(model_dir) == before


# -- a manifest that parses but is wrong ------------------------------------------------------------
def _set(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


def _drop_outputs(data: dict[str, Any]) -> None:
    for checks in data["artifacts"]["onnx"]["verification"]["towers"].values():
        for check in checks:
            del check["outputs"]


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (_set(["artifacts"], "hf,onnx"), "'artifacts' must be an object, got a string"),
        (_set(["artifacts", "onnx", "files", 0, "size"], "1234"), "artifacts.onnx.files[0].size must be an integer, got a string"),
        (_drop_outputs, ".outputs is missing"),
        (_set(["artifacts", "onnx", "files"], {"vision.onnx": 1}), "artifacts.onnx.files must be a list, got an object"),
        (_set(["artifacts", "onnx", "files", 0, "path"], "../../etc/passwd"), "is not a plain relative path"),
        (_set(["artifacts", "onnx", "parent"], 7), "artifacts.onnx.parent must be a string or null, got a number"),
    ],
    ids=["artifacts-a-string", "size-a-string", "verification-without-outputs", "files-an-object", "path-outside", "parent-a-number"],
)
@pytest.mark.parametrize("command", ["info", "quantize"])
def test_a_manifest_with_a_field_of_the_wrong_type_is_refused_in_one_line(
    change: Callable[[dict[str, Any]], None], fragment: str, command: str, converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]
) -> None:
    model_dir = copy_model_dir(converted("clip"))
    data = manifest(model_dir)
    change(data)
    (model_dir / "vlmopt.json").write_text(json.dumps(data))
    before = snapshot(model_dir)

    result = vlmopt(command, model_dir)

    assert_bad_input(result, "is malformed", fragment)
    assert snapshot(model_dir) == before
