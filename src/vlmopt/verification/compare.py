"""Comparing outputs: the numbers every verification and the bench fidelity column rest on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


def compare_feeds(
    reference: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    candidate: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    feeds: list[dict[str, np.ndarray]],
) -> dict[str, dict[str, Any]]:
    """Per output over all feeds: the largest max-abs-diff (and the index of the feed where it occurred),
    the smallest cosine and the mean of the per-feed mean cosines."""
    worst: dict[str, dict[str, Any]] = {}
    means: dict[str, list[float]] = {}
    for index, feed in enumerate(feeds):
        expected, actual = reference(feed), candidate(feed)
        for name in expected:
            if name not in actual:
                raise ValueError(f"the candidate has no output '{name}' (it has {', '.join(actual)})")
            result = compare(name, expected[name], actual[name])
            seen = worst.setdefault(name, {"output": name, "max_abs_diff": -1.0, "cosine_min": 1.0, "feed": 0})
            if result.max_abs_diff > seen["max_abs_diff"]:
                seen.update(max_abs_diff=result.max_abs_diff, feed=index)
            seen["cosine_min"] = min(seen["cosine_min"], result.cosine_min)
            means.setdefault(name, []).append(result.cosine_mean)
    for name, seen in worst.items():
        seen["cosine_mean"] = float(np.mean(means[name]))
    return worst


def top1(image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
    """Index of the best-matching prompt per image (cosine similarity; a logit scale or bias does not change it)."""
    images = image_embeds / np.linalg.norm(image_embeds, axis=1, keepdims=True)
    texts = text_embeds / np.linalg.norm(text_embeds, axis=1, keepdims=True)
    return np.argmax(images @ texts.T, axis=1)


def agreement(reference_top1: np.ndarray, candidate_top1: np.ndarray) -> float:
    """Fraction of images whose top-1 prompt is the same for both."""
    return float(np.mean(reference_top1 == candidate_top1))
