"""Versions of the tools that made an artifact, read from package metadata (no imports)."""

from __future__ import annotations

import platform
from functools import lru_cache
from importlib import metadata

_TOOLS = ("vlmopt", "torch", "transformers", "onnx", "onnxruntime", "onnxscript", "openvino", "nncf")


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=1)
def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _TOOLS:
        version = package_version(name)
        if version is not None:
            versions[name] = version
    return versions
