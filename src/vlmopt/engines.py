"""TensorRT engines without TensorRT: optimization profiles, engine metadata and the checks that gate loading.

Everything here is plain Python so it is tested on machines with no GPU; `stages/build.py` and
`runners/tensorrt_runner.py` are the only modules that import `tensorrt`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from vlmopt.errors import VlmoptError
from vlmopt.families import Tower

#: TensorRT versions vlmopt builds with: 10.x needs the STRONGLY_TYPED flag, 11.x is strongly typed only
MIN_TENSORRT = (10, 0)
#: TensorRT's names for hardware-compatibility levels, by vlmopt's option values
HARDWARE_COMPATIBILITY = {"none": "NONE", "ampere+": "AMPERE_PLUS", "same-cc": "SAME_COMPUTE_CAPABILITY"}
_DIMS = re.compile(r"^\d+(x\d+)*$")


@dataclass(frozen=True)
class Profile:
    """min/opt/max shape of one engine input."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_json(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_json(cls, data: dict[str, list[int]]) -> Profile:
        return cls(tuple(data["min"]), tuple(data["opt"]), tuple(data["max"]))

    def admits(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.min) and all(lo <= n <= hi for lo, n, hi in zip(self.min, shape, self.max, strict=True))


def parse_version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def check_tensorrt_version(version: str) -> None:
    if parse_version(version)[:2] < MIN_TENSORRT:
        raise VlmoptError(f"TensorRT {version} is too old: vlmopt builds strongly typed networks, which need TensorRT >= 10.0; pip install 'vlmopt[tensorrt]'")


def parse_shape_override(text: str) -> tuple[str, Profile]:
    """`name:MIN,OPT,MAX` with each shape as `1x77` (the form trtexec's --minShapes etc. use per input)."""
    name, sep, shapes = text.rpartition(":")
    parts = shapes.split(",")
    if not sep or not name or len(parts) != 3 or not all(_DIMS.match(p) for p in parts):
        raise VlmoptError(f"--shapes takes name:MIN,OPT,MAX with shapes like 1x77 (e.g. input_ids:1x77,8x77,32x77), got '{text}'")
    low, opt, high = (tuple(int(d) for d in p.split("x")) for p in parts)
    if not len(low) == len(opt) == len(high):
        raise VlmoptError(f"--shapes {text}: min, opt and max must have the same rank")
    if not all(a <= b <= c for a, b, c in zip(low, opt, high, strict=True)):
        raise VlmoptError(f"--shapes {text}: every dimension needs min <= opt <= max")
    if any(d < 1 for d in low):
        raise VlmoptError(f"--shapes {text}: dimensions must be at least 1")
    return name, Profile(low, opt, high)


def derive_profiles(tower: Tower, opt_batch: int, max_batch: int, max_seq: int | None, overrides: dict[str, Profile] | None = None) -> dict[str, Profile]:
    """One profile per input from the tower's axes: batch 1/opt/max, sequence 1/max/max (a model's usual text
    length is its longest, CLIP's 77), fixed dimensions as they are; `overrides` replace whole inputs."""
    if not 1 <= opt_batch <= max_batch:
        raise VlmoptError(f"--opt-batch ({opt_batch}) must be between 1 and --max-batch ({max_batch})")
    longest = tower.vocab.max_length if tower.vocab else None
    if max_seq is not None and longest is not None and max_seq > longest:
        raise VlmoptError(f"--max-seq {max_seq} is longer than the {tower.name} tower's {longest} positions")
    sequence = max_seq or longest or 1
    overrides = dict(overrides or {})
    profiles = {}
    for spec in tower.inputs:
        if spec.name in overrides:
            profile = overrides.pop(spec.name)
            if len(profile.min) != len(spec.shape):
                raise VlmoptError(f"--shapes {spec.name}: the input has rank {len(spec.shape)}, the override {len(profile.min)}")
            fixed = [(i, d) for i, d in enumerate(spec.shape) if isinstance(d, int)]
            if any(shape[i] != d for i, d in fixed for shape in (profile.min, profile.opt, profile.max)):
                raise VlmoptError(f"--shapes {spec.name}: dimensions fixed in the graph ({spec.shape}) cannot change")
            profiles[spec.name] = profile
            continue
        dims = []
        for axis in spec.shape:
            if isinstance(axis, int):
                dims.append((axis, axis, axis))
            elif axis == "sequence":
                dims.append((1, sequence, sequence))
            else:  # batch axes
                dims.append((1, opt_batch, max_batch))
        low, opt, high = zip(*dims, strict=True) if dims else ((), (), ())
        profiles[spec.name] = Profile(tuple(low), tuple(opt), tuple(high))
    if overrides:
        raise VlmoptError(f"--shapes names {', '.join(overrides)}, but the {tower.name} tower's inputs are {', '.join(s.name for s in tower.inputs)}")
    return profiles


def engine_metadata(tensorrt_version: str, gpu: str, compute_capability: tuple[int, int], profiles: dict[str, Profile], **extra: Any) -> dict[str, Any]:
    return {
        "tensorrt_version": tensorrt_version,
        "gpu": gpu,
        "compute_capability": f"{compute_capability[0]}.{compute_capability[1]}",
        "profiles": {name: p.to_json() for name, p in profiles.items()},
        **extra,
    }


def check_engine_compatible(meta: dict[str, Any], tensorrt_version: str, gpu: str, compute_capability: tuple[int, int], rebuild: str) -> None:
    """Refuse an engine built by another TensorRT or for another GPU, saying what it was built for and how to rebuild.

    A version-compatible engine loads on later TensorRT releases of the same major; a hardware-compatible one
    (ampere+) on any GPU of compute capability >= 8.0; a plain engine needs the exact version and compute capability.
    """
    built, here = meta["tensorrt_version"], tensorrt_version
    capability = f"{compute_capability[0]}.{compute_capability[1]}"
    what = f"TensorRT {built} on {meta['gpu']} (compute capability {meta['compute_capability']})"
    if meta.get("version_compatible"):
        same_version = parse_version(built)[0] == parse_version(here)[0] and parse_version(built) <= parse_version(here)
    else:
        same_version = parse_version(built) == parse_version(here)
    if not same_version:
        raise VlmoptError(f"this engine was built with {what}; this machine has TensorRT {here}. Rebuild it here: {rebuild}")
    level = meta.get("hardware_compatibility", "none")
    fits = compute_capability >= (8, 0) if level == "ampere+" else meta["compute_capability"] == capability
    if not fits:
        raise VlmoptError(f"this engine was built with {what}; this GPU is {gpu} (compute capability {capability}). Rebuild it here: {rebuild}")
