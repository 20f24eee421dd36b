"""The Dockerfile the README documents for `vlmopt serve`, checked with a Dockerfile parser (no container engine here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "examples" / "serve.Dockerfile"


@pytest.fixture(scope="module")
def instructions() -> list[dict]:
    parser = DockerfileParser(fileobj=DOCKERFILE.open("rb"))
    return parser.structure


def _values(instructions: list[dict], kind: str) -> list[str]:
    return [i["value"] for i in instructions if i["instruction"] == kind]


def test_dockerfile_builds_from_a_python_image_and_installs_pinned_torch_before_vlmopt_serve(instructions: list[dict]) -> None:
    assert _values(instructions, "FROM") == ["python:3.11-slim"]
    runs = _values(instructions, "RUN")
    torch = next(i for i, r in enumerate(runs) if "torch==2.13.0" in r)
    package = next(i for i, r in enumerate(runs) if '".[serve]"' in r)
    assert torch < package


def test_dockerfile_runs_the_server_as_a_user_on_every_interface_with_a_readiness_check(instructions: list[dict]) -> None:
    assert _values(instructions, "USER") == ["vlmopt"]
    assert _values(instructions, "EXPOSE") == ["8000"]
    entrypoint = json.loads(_values(instructions, "ENTRYPOINT")[0])
    assert entrypoint[:3] == ["vlmopt", "serve", "/model"]
    assert entrypoint[entrypoint.index("--host") + 1] == "0.0.0.0"
    assert entrypoint[entrypoint.index("--port") + 1] == "8000"
    assert "/ready" in _values(instructions, "HEALTHCHECK")[0]
    assert _values(instructions, "STOPSIGNAL") == ["SIGTERM"]


def test_dockerfile_copies_only_what_the_package_needs(instructions: list[dict]) -> None:
    copied = {value.split()[0] for value in _values(instructions, "COPY")}
    assert copied == {"pyproject.toml", "src"}
    assert all((ROOT / path).exists() for path in ("pyproject.toml", "README.md", "src"))


def test_readme_shows_the_dockerfile_as_it_is() -> None:
    assert DOCKERFILE.read_text() in (ROOT / "README.md").read_text()
