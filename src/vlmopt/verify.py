"""Comparing outputs: the numbers every verification and the bench fidelity column rest on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class OutputComparison:
    output: str
    max_abs_diff: float
    cosine_mean: float
    cosine_min: float

    def to_json(self) -> dict[str, float | str]:
        return dict(self.__dict__)


def rowwise_cosine(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Cosine similarity per batch row (over all other axes); rows that are both zero count as 1."""
    a = reference.reshape(reference.shape[0], -1).astype(np.float64)
    b = candidate.reshape(candidate.shape[0], -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = (a * b).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = np.where(norms > 0, dots / norms, np.where(np.abs(a).sum(1) + np.abs(b).sum(1) == 0, 1.0, 0.0))
    return cosine


def compare(name: str, reference: np.ndarray, candidate: np.ndarray) -> OutputComparison:
    if reference.shape != candidate.shape:
        raise ValueError(f"output '{name}' has shape {candidate.shape}, expected {reference.shape}")
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    cosine = rowwise_cosine(reference, candidate)
    return OutputComparison(name, float(diff.max(initial=0.0)), float(cosine.mean()), float(cosine.min()))
