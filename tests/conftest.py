"""Shared fixtures: tiny demo checkpoints and model directories, each built once per session.

Session fixtures hand out pristine directories; a test that changes one works on a copy
(`copy_model_dir`). Nothing here reaches a model hub.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Before transformers is imported anywhere: a test must never reach the hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402
from click.testing import Result  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from vlmopt.cli import app  # noqa: E402
from vlmopt.demo import build_demo_model  # noqa: E402
from vlmopt.workspace import MANIFEST_NAME  # noqa: E402

FAMILIES = ("clip", "siglip", "vit", "vit-classifier", "bert")
TOWERS = {
    "clip": ("text", "vision"),
    "siglip": ("text", "vision"),
    "vit": ("vision",),
    "vit-classifier": ("vision",),
    "bert": ("text",),
}


def family_params() -> list[Any]:
    """Every demo family."""
    return list(FAMILIES)


def vlmopt(*args: object) -> Result:
    """Run the CLI in-process, as a user would type it."""
    return CliRunner().invoke(app, [str(a) for a in args])


def vlmopt_process(*args: object, stdout: Any = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    """Run the entry point `main()` in a new process, for what only it does (usage errors, stdout handling)."""
    return subprocess.run([sys.executable, "-m", "vlmopt", *map(str, args)], stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=300)


@contextlib.contextmanager
def without_root_override() -> Iterator[None]:
    """File permissions apply to this thread as to any user: as root, drop the capabilities that bypass
    them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) from the effective set for the block."""
    if os.geteuid() != 0:
        yield
        return
    import pytest

    libc = ctypes.CDLL(None, use_errno=True)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    data = (ctypes.c_uint32 * 6)()  # (effective, permitted, inheritable) x 2
    if libc.capget(header, data) != 0:
        pytest.skip("cannot read this thread's capabilities")
    saved = list(data)
    data[0] &= ~((1 << 1) | (1 << 2))
    if libc.capset(header, data) != 0:
        pytest.skip("cannot drop CAP_DAC_OVERRIDE as root here")
    try:
        yield
    finally:
        restore = (ctypes.c_uint32 * 6)(*saved)
        libc.capset(header, restore)


def vlmopt_json(*args: object) -> dict[str, Any]:
    """Run a command with --json that must succeed; its stdout parsed."""
    result = vlmopt(*args, "--json")
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.stderr}"
    return json.loads(result.stdout)


def manifest(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / MANIFEST_NAME).read_text())


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under `folder` with a hash of its content (the lock file too: it exists only while held)."""
    state = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        state[rel] = "<dir>" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def leftovers(folder: Path) -> list[str]:
    """Temporary folders or files a stage left behind."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith((".tmp-", ".old-")))


def assert_bad_input(result: Result, *fragments: str) -> None:
    """Exit 2 with one line on stderr naming what was wrong, and no traceback."""
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output}"
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def assert_refused(model_dir: Path, command: str, *args: object, fragments: tuple[str, ...] = ()) -> str:
    """`vlmopt command model_dir *args` is refused as bad input (exit 2, one line naming `fragments`) and leaves
    the directory exactly as before, with no temporary files; returns the error line."""
    before = snapshot(model_dir)

    result = vlmopt(command, model_dir, *args)

    assert_bad_input(result, *fragments)
    assert snapshot(model_dir) == before
    assert leftovers(model_dir) == []
    return result.stderr.strip()


class _Cache:
    """Lazily builds one artifact per key and remembers it (or the failure) for the session."""

    def __init__(self, make: Callable[[str], Path]):
        self._make = make
        self._done: dict[str, Path | BaseException] = {}

    def __call__(self, key: str) -> Path:
        if key not in self._done:
            try:
                self._done[key] = self._make(key)
            except Exception as exc:  # remembered so a failing build is not retried by every test
                self._done[key] = exc
        value = self._done[key]
        if isinstance(value, BaseException):
            raise value
        return value


@pytest.fixture(scope="session")
def demo_source(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """A tiny Hugging Face folder (random weights) per family: `demo_source("clip")`."""
    root = tmp_path_factory.mktemp("sources")
    return _Cache(lambda family: build_demo_model(root / family, family, "tiny"))


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory, demo_source: Callable[[str], Path]) -> Callable[[str], Path]:
    """A model directory holding only the `hf` artifact of a family's demo model."""
    root = tmp_path_factory.mktemp("exported")

    def make(family: str) -> Path:
        model_dir = root / family
        result = vlmopt("export", demo_source(family), "-o", model_dir)
        assert result.exit_code == 0, f"export of {family} failed with exit {result.exit_code}: {result.stderr}"
        return model_dir

    return _Cache(make)


@pytest.fixture(scope="session")
def converted(tmp_path_factory: pytest.TempPathFactory, exported: Callable[[str], Path]) -> Callable[[str], Path]:
    """A model directory with `hf` and its default `onnx` conversion."""
    root = tmp_path_factory.mktemp("converted")

    def make(family: str) -> Path:
        model_dir = root / family
        shutil.copytree(exported(family), model_dir)
        result = vlmopt("convert", model_dir)
        assert result.exit_code == 0, f"convert of {family} failed with exit {result.exit_code}: {result.stderr}"
        return model_dir

    return _Cache(make)


@pytest.fixture(scope="session")
def torch_converted(tmp_path_factory: pytest.TempPathFactory, exported: Callable[[str], Path]) -> Callable[[str], Path]:
    """A generative model directory with `hf` and its `onnx` conversion with the decoder exported from PyTorch
    (`convert --decoder torch`); copy it before writing to it."""
    root = tmp_path_factory.mktemp("torch-converted")

    def make(family: str) -> Path:
        model_dir = root / family
        shutil.copytree(exported(family), model_dir)
        result = vlmopt("convert", model_dir, "--decoder", "torch")
        assert result.exit_code == 0, f"convert --decoder torch of {family} failed with exit {result.exit_code}: {result.stderr}"
        return model_dir

    return _Cache(make)


@pytest.fixture(scope="session")
def static_clip(tmp_path_factory: pytest.TempPathFactory, exported: Callable[[str], Path]) -> Path:
    """The tiny CLIP converted with fixed shapes: batch 2, sequence 8."""
    model_dir = tmp_path_factory.mktemp("static") / "clip"
    shutil.copytree(exported("clip"), model_dir)
    result = vlmopt("convert", model_dir, "--static", "--batch-size", "2", "--seq-len", "8")
    assert result.exit_code == 0, result.stderr
    return model_dir


@pytest.fixture(scope="session")
def retrained_clip_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny CLIP architecture with other weights (another seed)."""
    return build_demo_model(tmp_path_factory.mktemp("retrained") / "clip", "clip", "tiny", seed=1)


@pytest.fixture
def reexported_clip(converted: Callable[[str], Path], retrained_clip_source: Path, copy_model_dir: Callable[[Path], Path]) -> Path:
    """A converted tiny CLIP whose `hf` artifact was then re-exported from other weights."""
    model_dir = copy_model_dir(converted("clip"))
    result = vlmopt("export", retrained_clip_source, "-o", model_dir)
    assert result.exit_code == 0, result.stderr
    return model_dir


@pytest.fixture
def copy_model_dir(tmp_path: Path) -> Callable[[Path], Path]:
    """A private copy of a shared model directory, for tests that change it."""

    def copy(model_dir: Path) -> Path:
        dest = tmp_path / f"copy-{model_dir.name}"
        shutil.copytree(model_dir, dest)
        return dest

    return copy


# -- recipes -------------------------------------------------------------------------------------
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

#: a recipe over the tiny demo CLIP: every kind of step, one this machine cannot run (build), gates
TINY_RECIPE = """\
source: demo:clip-tiny
model_dir: ../build/clip
steps:
  - convert: {}
  - optimize: {}
  - quantize: {mode: int8-dynamic, from: onnx-opt}
  - quantize:
      mode: int8-static
      calib_images: ../data/images
      calib_text: ../data/prompts.txt
  - build: {from: onnx}
  - bench: {batch: [1, 2], iterations: 2, warmup: 0}
gates:
  max_size_mb: {int8-static: 50}
  min_cosine: {int8-static: 0.99}
  min_speedup: {int8-dynamic: 0.01}
"""


def tensorrt_and_gpu_here() -> bool:
    from vlmopt.errors import VlmoptError
    from vlmopt.machine import require_tensorrt_gpu

    try:
        require_tensorrt_gpu()
    except VlmoptError:
        return False
    return True


def write_recipe(folder: Path, text: str, name: str = "recipe.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def run_json(*args: object) -> tuple[int, dict[str, Any]]:
    """`vlmopt run ... --json`: its exit code and its one JSON object."""
    result = vlmopt("run", *args, "--json")
    assert "Traceback" not in result.output, result.output
    return result.exit_code, json.loads(result.stdout)


def statuses(payload: dict[str, Any]) -> dict[str, str]:
    return {step["id"]: step["status"] for step in payload["steps"]}


@pytest.fixture(scope="session")
def recipe_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the example calibration data in data/ and TINY_RECIPE in recipes/tiny.yaml (model_dir build/clip)."""
    root = tmp_path_factory.mktemp("recipes")
    shutil.copytree(EXAMPLES / "data", root / "data")
    write_recipe(root / "recipes", TINY_RECIPE, "tiny.yaml")
    return root


@pytest.fixture(scope="session")
def first_run(recipe_workspace: Path) -> dict[str, Any]:
    """The tiny recipe's first run (`--json`), which makes everything."""
    code, payload = run_json(recipe_workspace / "recipes" / "tiny.yaml")
    assert code == 0, payload
    return payload


@pytest.fixture
def model_dir_copy(recipe_workspace: Path, first_run: dict[str, Any]) -> Iterator[Callable[[str], Path]]:
    """A private copy of the tiny recipe's model directory beside it (so the same demo checkpoint serves it)."""
    made: list[Path] = []

    def copy(name: str) -> Path:
        dest = recipe_workspace / "build" / name
        shutil.copytree(recipe_workspace / "build" / "clip", dest)
        made.append(dest)
        return dest

    yield copy
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


def recipe_variant(recipe_workspace: Path, name: str, model_dir: str, *replacements: tuple[str, str]) -> Path:
    """TINY_RECIPE with each (old, new) replaced, writing to build/MODEL_DIR, saved as recipes/NAME."""
    text = TINY_RECIPE.replace("model_dir: ../build/clip", f"model_dir: ../build/{model_dir}")
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new)
    return write_recipe(recipe_workspace / "recipes", text, name)
