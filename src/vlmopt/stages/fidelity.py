"""Checking a derived ONNX artifact (optimized, fp16, int8, int4) against its fp32 parent on the same inputs.

Per tower and output: cosine (mean and min over rows) and max |diff|; for dual encoders also the
zero-shot top-1 agreement of the two (a batch of images against a set of prompts). Thresholds fail
the stage with `CheckFailed`, which `ModelDir.produce` turns into "nothing committed".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlmopt.calibration import CalibrationData, batches, sample_count
from vlmopt.errors import CheckFailed
from vlmopt.families import Tower
from vlmopt.inputs import make_inputs, verification_sizes
from vlmopt.runners import OrtRunner, Runner
from vlmopt.verify import agreement, compare_feeds, top1

#: images and prompts of the synthetic zero-shot set
ZERO_SHOT_IMAGES, ZERO_SHOT_PROMPTS = 16, 16
#: most real samples used for evaluation
EVAL_SAMPLES = 32


@dataclass
class Thresholds:
    min_cosine: float | None = 0.99
    min_agreement: float | None = None
    atol: float | None = None

    def describe(self) -> dict[str, float | None]:
        return {"min_cosine": self.min_cosine, "min_agreement": self.min_agreement, "atol": self.atol}


def evaluation_feeds(tower: Tower, data: CalibrationData | None) -> tuple[list[dict[str, np.ndarray]], str]:
    """Synthetic feeds at two shapes and at batch 8, plus the user's real samples when there are any."""
    max_seq = tower.vocab.max_length if tower.vocab else 1
    shapes = [*verification_sizes(tower), {"batch": 8, "image_batch": 4, "text_batch": 8, "sequence": max_seq}]
    feeds = [make_inputs(tower, sizes, seed=100 + i) for i, sizes in enumerate(shapes)]
    real = data.for_tower(tower) if data else None
    if real is not None:
        feeds += batches({k: v[:EVAL_SAMPLES] for k, v in real.items()})
        return feeds, "synthetic + real samples"
    return feeds, "synthetic"


def check(
    parent_dir: Path,
    parent_files: dict[str, str],
    candidate_dir: Path,
    candidate_files: dict[str, str],
    towers: dict[str, Tower],
    thresholds: Thresholds,
    data: CalibrationData | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Compare every ONNX tower of the candidate with the parent's; raise `CheckFailed` below a threshold."""
    references = {name: OrtRunner(parent_dir / parent_files[name], threads=threads) for name in towers}
    candidates = {name: OrtRunner(candidate_dir / candidate_files[name], threads=threads) for name in towers}
    try:
        return check_runners(towers, references, candidates, thresholds, data)
    finally:
        for runner in [*references.values(), *candidates.values()]:
            runner.close()


def check_runners(
    towers: dict[str, Tower],
    references: dict[str, Runner],
    candidates: dict[str, Runner],
    thresholds: Thresholds,
    data: CalibrationData | None = None,
    admits: dict[str, Callable[[dict[str, np.ndarray]], bool]] | None = None,
) -> dict[str, Any]:
    """Compare candidate runners with reference runners, tower by tower, on the same inputs (any backends).

    `admits` (per tower) drops feeds a candidate cannot take, such as shapes outside a TensorRT engine's profile."""
    results: dict[str, Any] = {}
    for name, tower in towers.items():
        feeds, origin = evaluation_feeds(tower, data)
        if admits:
            feeds = [feed for feed in feeds if _fits(admits, name, feed)]
            if not feeds:
                raise CheckFailed(f"{name} tower: none of the verification inputs fits the engine's shape profile; widen --max-batch/--max-seq")
        outputs = compare_feeds(references[name].run, candidates[name].run, feeds)
        for seen in outputs.values():
            seen.pop("feed")
        results[name] = {"outputs": outputs, "feeds": len(feeds), "data": origin}
    runners = {name: (references[name], candidates[name]) for name in towers}
    zero_shot = _zero_shot(towers, runners, data, admits)
    verification = {"reference": None, **thresholds.describe(), "towers": results, "zero_shot": zero_shot, "passed": True}
    failures = _failures(verification, thresholds)
    if failures:
        verification["passed"] = False
        raise CheckFailed("; ".join(failures) + "; nothing was written", details={"verification": verification})
    return verification


def _failures(verification: dict[str, Any], thresholds: Thresholds) -> list[str]:
    failures = []
    for tower, result in verification["towers"].items():
        for output in result["outputs"].values():
            if thresholds.min_cosine is not None and output["cosine_min"] < thresholds.min_cosine:
                failures.append(
                    f"{tower} tower: cosine min of {output['output']} is {output['cosine_min']:.6f}, "
                    f"below --min-cosine {thresholds.min_cosine:g} by {thresholds.min_cosine - output['cosine_min']:.2g}"
                )
            if thresholds.atol is not None and output["max_abs_diff"] > thresholds.atol:
                failures.append(f"{tower} tower: {output['output']} differs by {output['max_abs_diff']:.3g} (> --atol {thresholds.atol:g})")
    zero_shot = verification["zero_shot"]
    if thresholds.min_agreement is not None and zero_shot is not None and zero_shot["agreement"] < thresholds.min_agreement:
        failures.append(
            f"zero-shot top-1 agreement is {zero_shot['agreement']:.3f} ({zero_shot['images']} images x {zero_shot['prompts']} prompts), "
            f"below --min-agreement {thresholds.min_agreement:g} by {thresholds.min_agreement - zero_shot['agreement']:.3g}"
        )
    return failures


def _zero_shot(
    towers: dict[str, Tower], runners: dict[str, tuple[Runner, Runner]], data: CalibrationData | None, admits: dict[str, Callable[..., bool]] | None = None
) -> dict[str, Any] | None:
    """Top-1 agreement between reference and candidate: images against prompts, both through each's own towers."""
    if "vision" in towers and "text" in towers:
        image_feed, image_origin = _zero_shot_feed(towers["vision"], data, ZERO_SHOT_IMAGES)
        text_feed, text_origin = _zero_shot_feed(towers["text"], data, ZERO_SHOT_PROMPTS)
        if not (_fits(admits, "vision", image_feed) and _fits(admits, "text", text_feed)):
            return None
        picks = []
        for side in (0, 1):
            images = _single_output(runners["vision"][side].run(image_feed))
            texts = _single_output(runners["text"][side].run(text_feed))
            picks.append(top1(images, texts))
        return {
            "agreement": agreement(*picks),
            "images": sample_count([image_feed]),
            "prompts": sample_count([text_feed]),
            "data": f"images: {image_origin}, prompts: {text_origin}",
        }
    if "model" in towers and any(spec.name == "logits_per_image" for spec in towers["model"].outputs):
        tower = towers["model"]
        max_seq = tower.vocab.max_length if tower.vocab else 1
        feed = make_inputs(tower, {"image_batch": ZERO_SHOT_IMAGES, "text_batch": ZERO_SHOT_PROMPTS, "sequence": min(16, max_seq)}, seed=7)
        if not _fits(admits, "model", feed):
            return None
        picks = [np.argmax(runners["model"][side].run(feed)["logits_per_image"], axis=1) for side in (0, 1)]
        return {"agreement": agreement(*picks), "images": ZERO_SHOT_IMAGES, "prompts": ZERO_SHOT_PROMPTS, "data": "synthetic"}
    return None


def _fits(admits: dict[str, Callable[..., bool]] | None, tower: str, feed: dict[str, np.ndarray]) -> bool:
    """Whether the candidate takes `feed` (always, unless an `admits` check for the tower says otherwise)."""
    return admits is None or tower not in admits or admits[tower](feed)


def _zero_shot_feed(tower: Tower, data: CalibrationData | None, count: int) -> tuple[dict[str, np.ndarray], str]:
    real = data.for_tower(tower) if data else None
    if real is not None and len(next(iter(real.values()))) >= 2:
        return {k: v[:EVAL_SAMPLES] for k, v in real.items()}, "real"
    max_seq = tower.vocab.max_length if tower.vocab else 1
    return make_inputs(tower, {"batch": count, "sequence": min(16, max_seq)}, seed=7), "synthetic"


def _single_output(outputs: dict[str, np.ndarray]) -> np.ndarray:
    return next(iter(outputs.values()))
