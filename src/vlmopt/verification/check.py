"""Checking an artifact against its reference (PyTorch, or its fp32 parent) on the same inputs, before it is committed.

Per tower and per kind of data: cosine (mean and min over rows) and max |diff| of every output, on the
real evaluation data (`vlmopt.evaluation`: built-in sentences and photos through the model's own
tokenizer and image processor, plus the user's `--eval-images`/`--eval-text`) and on synthetic random
inputs at three shapes. The gates apply to the real figures; the synthetic ones are reported beside them,
and gated only for a tower the model has no tokenizer or image processor for (the record says so).
Task metrics: for dual encoders the zero-shot top-1 agreement (real photos against captions, each side
through its own tower), for text encoders the retrieval top-1 agreement (queries ranked over passages),
for image classifiers the top-1 class agreement on the photos.
Gates (`Gates`) fail the stage with `CheckFailed`, which `ModelDir.produce` turns into "nothing
committed". Any backend: the runners come from `vlmopt.runners.ArtifactRunners`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlmopt.calibration import sample_count
from vlmopt.errors import CheckFailed
from vlmopt.evaluation import EvalData
from vlmopt.families import Tower
from vlmopt.inputs import contract_sizes, make_inputs, verification_sizes
from vlmopt.records import DataCheck, MetricCheck, OutputCheck, Verification
from vlmopt.runners.base import Runner
from vlmopt.verification.compare import agreement, compare_feeds, top1

#: images and prompts of the synthetic zero-shot set
ZERO_SHOT_IMAGES, ZERO_SHOT_PROMPTS = 16, 16
ZERO_SHOT = "zero-shot top-1 agreement"
RETRIEVAL = "retrieval top-1 agreement"
CLASSIFICATION = "classification top-1 agreement"

Admits = Callable[[dict[str, np.ndarray]], bool]
#: a family's own checks run with a verification: (data checks per tower, metric checks)
ExtraChecks = Callable[[], tuple[dict[str, list[DataCheck]], list[MetricCheck]]]


@dataclass
class Gates:
    """The thresholds a verification is held to; None: not applied."""

    min_cosine: float | None = None
    atol: float | None = None
    min_agreement: float | None = None
    min_token_agreement: float | None = None
    max_ppl_increase: float | None = None

    @classmethod
    def of(cls, options: Any) -> Gates:
        """The gates a stage's options declare (`--min-cosine`, `--atol`, `--min-agreement`), those it lacks off."""
        return cls(**{f.name: getattr(options, f.name, None) for f in dataclasses.fields(cls)})

    def to_json(self) -> dict[str, float | None]:
        return dataclasses.asdict(self)


@dataclass
class FeedSet:
    """Inputs of one kind for one tower: `real` samples or `synthetic` random ones; `where` labels each feed's shape."""

    data: str
    source: str
    feeds: list[dict[str, np.ndarray]]
    where: list[dict[str, int]] = field(default_factory=list)
    gated: bool = True


def evaluation_sets(tower: Tower, data: EvalData | None = None) -> list[FeedSet]:
    """The real sets of `data` (gated), and synthetic feeds at two shapes and at batch 8 (reported; gated only
    where the tower has no real data, with the reason in their source).

    A tower whose quality is judged by task metrics instead (`meta["similarity_gated"]` false: a decoder, whose
    token agreement and perplexity the family checks) is compared on them for the record, not gated."""
    similarity = tower.meta.get("similarity_gated", True)
    real = real_sets(tower, data, gated=similarity)
    why = None if real or not similarity else _why_synthetic(tower, data)
    return [synthetic_set(tower, gated=similarity and not real, why=why), *real]


def real_sets(tower: Tower, data: EvalData | None, gated: bool = True) -> list[FeedSet]:
    if data is None:
        return []
    return [FeedSet("real", s.source, s.feeds, gated=gated) for s in data.for_tower(tower).real if s.feeds]


def synthetic_set(tower: Tower, gated: bool, why: str | None = None) -> FeedSet:
    max_seq = tower.vocab.max_length if tower.vocab else 1
    large = {"batch": 8, "image_batch": 4, "text_batch": 8, "sequence": max_seq}
    if tower.derived_axes:  # generative parts: their bench sizes, not the full context
        large = {**large, **tower.bench_sizes, "batch": 4}
    shapes = [*verification_sizes(tower), large]
    source = "random inputs" + (f" (gated: {why})" if why else "")
    return FeedSet("synthetic", source, [make_inputs(tower, sizes, seed=100 + i) for i, sizes in enumerate(shapes)], _axes(tower, shapes), gated=gated)


def _why_synthetic(tower: Tower, data: EvalData | None) -> str:
    if data is None:
        return "no real evaluation data was given to this check"
    return data.for_tower(tower).missing or "no real sample fits it"


def shape_sets(tower: Tower, shapes: list[dict[str, int]], data: EvalData | None = None) -> list[FeedSet]:
    """Synthetic feeds at exactly these shapes (convert's check of the exporter at two shapes that differ in every
    axis, gated), plus the tower's real sets (gated too: real inputs are what the export will be sent)."""
    synthetic = FeedSet(
        "synthetic", "random inputs at two shapes", [make_inputs(tower, sizes, seed=seed) for seed, sizes in enumerate(shapes)], _axes(tower, shapes)
    )
    return [synthetic, *real_sets(tower, data)]


def _axes(tower: Tower, shapes: list[dict[str, int]]) -> list[dict[str, int]]:
    return [{k: v for k, v in contract_sizes(tower, s).items() if k in tower.axes} for s in shapes]


def verify_runners(
    towers: dict[str, Tower],
    reference: Callable[[Tower], Runner],
    candidate: Callable[[Tower], Runner],
    gates: Gates,
    reference_name: str,
    sets: Callable[[Tower], list[FeedSet]] | None = None,
    data: EvalData | None = None,
    admits: dict[str, Admits] | None = None,
    extra: ExtraChecks | None = None,
) -> Verification:
    """Compare candidate runners with reference runners tower by tower (any backends), on the same inputs.

    `reference(tower)`/`candidate(tower)` open a runner (closed here when the tower is done). The reference runs
    first, on every tower and every input, and its outputs are kept; only then does a candidate load, so the two
    are never in memory together (a PyTorch model and its exported parts: model a's convert peaked at 2193 MB with
    both). `admits` (per tower) drops feeds a candidate cannot take, such as shapes outside a TensorRT engine's
    profile. `extra()` adds a family's own checks (data checks per tower, metric checks), gated like the rest; it
    runs between the reference and the candidates. Raises `CheckFailed`, the verification in its details, when a
    gate fails."""
    chosen = sets or (lambda tower: evaluation_sets(tower, data))
    plans = {name: _plan(tower, chosen, data, admits.get(name) if admits else None) for name, tower in towers.items()}
    kept: dict[int, dict[str, np.ndarray]] = {}
    for name, plan in plans.items():
        with reference(towers[name]) as ref:
            for feed in plan.feeds():
                # copies: a runner may hand back views of buffers it reuses or frees on close (OpenVINO, TensorRT)
                kept[id(feed)] = {output: np.array(value, copy=True) for output, value in ref.run(feed).items()}
    more_checks, more_metrics = extra() if extra is not None else ({}, [])

    def expected(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return kept[id(feed)]

    checks: dict[str, list[DataCheck]] = {}
    picks: dict[str, tuple[Any, Any, str]] = {}
    metrics: list[MetricCheck] = []
    for name, plan in plans.items():
        with candidate(towers[name]) as cand:
            checks[name] = [_data_check(s, compare_feeds(expected, cand.run, s.feeds)) for s in plan.feed_sets]
            if plan.probe is not None:
                picks[name] = (_embed(expected, plan.probe[0]), _embed(cand.run, plan.probe[0]), plan.probe[1])
            if plan.retrieval is not None:
                metrics.append(_retrieval(expected, cand.run, plan.retrieval, gates))
            if plan.classify is not None:
                metrics.append(_classification(expected, cand.run, plan.classify, gates))
    for name, found in more_checks.items():
        checks.setdefault(name, []).extend(found)
    metrics = _zero_shot(towers, picks, gates) + metrics + more_metrics
    verification = Verification(reference_name, gates.to_json(), checks, metrics)
    verification.failures = _failures(verification, gates)
    verification.passed = not verification.failures
    if verification.failures:
        raise CheckFailed("; ".join(verification.failures) + "; nothing was written", details={"verification": verification.to_json()})
    return verification


@dataclass
class _Plan:
    """What one tower is checked on: its feed sets, its zero-shot probe and its retrieval probe, where they apply."""

    feed_sets: list[FeedSet]
    probe: tuple[list[dict[str, np.ndarray]], str] | None
    retrieval: tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]] | None
    classify: tuple[list[dict[str, np.ndarray]], str] | None = None

    def feeds(self) -> list[dict[str, np.ndarray]]:
        every = [feed for s in self.feed_sets for feed in s.feeds]
        if self.probe is not None:
            every += self.probe[0]
        if self.classify is not None:
            every += self.classify[0]
        if self.retrieval is not None:
            every += [*self.retrieval[0], *self.retrieval[1]]
        return every


def _plan(tower: Tower, sets: Callable[[Tower], list[FeedSet]], data: EvalData | None, fits: Admits | None) -> _Plan:
    feed_sets = sets(tower)
    if fits is not None:
        feed_sets = [dataclasses.replace(s, feeds=[f for f in s.feeds if fits(f)], where=[]) for s in feed_sets]
        feed_sets = [s for s in feed_sets if s.feeds]
        if not feed_sets:
            raise CheckFailed(f"{tower.name} tower: none of the verification inputs fits the engine's shape profile; widen --max-batch/--max-seq")
        if not any(s.gated for s in feed_sets):
            feed_sets = [dataclasses.replace(s, gated=True) for s in feed_sets]
    probe = _zero_shot_probe(tower, data)
    if probe is not None and fits is not None and not all(fits(f) for f in probe[0]):
        probe = None
    retrieval = data.for_tower(tower).retrieval if data is not None else None
    if retrieval is not None and fits is not None and not all(fits(f) for f in (*retrieval[0], *retrieval[1])):
        retrieval = None
    classify = _classification_probe(tower, data)
    if classify is not None and fits is not None and not all(fits(f) for f in classify[0]):
        classify = None
    return _Plan(feed_sets, probe, retrieval, classify)


def verify_artifacts(
    reference_dir: Path,
    reference: Any,
    candidate_dir: Path,
    candidate: Any,
    gates: Gates,
    data: EvalData | None = None,
    threads: int | None = None,
    sets: Callable[[Tower], list[FeedSet]] | None = None,
    admits: dict[str, Admits] | None = None,
    reference_model: Any = None,
    extra: ExtraChecks | None = None,
) -> Verification:
    """Compare every tower of `candidate` (an artifact in `candidate_dir`) with `reference`'s, through their runners.

    The reference runners (and `reference_model`) are released once the reference has run, before `extra` and the
    candidates: a family's own checks may load every part at once, and hold what they need of the model themselves."""
    from vlmopt.runners import ArtifactRunners

    with (
        ArtifactRunners(reference_dir, reference, threads=threads, model=reference_model) as references,
        ArtifactRunners(candidate_dir, candidate, threads=threads) as candidates,
    ):
        del reference_model  # the runners hold it now, until released
        towers = {name: record.tower for name, record in candidate.towers.items()}

        def released_first() -> tuple[dict[str, list[DataCheck]], list[MetricCheck]]:
            references.close()
            return extra() if extra is not None else ({}, [])

        return verify_runners(towers, references.runner, candidates.runner, gates, reference.name, sets=sets, data=data, admits=admits, extra=released_first)


def _data_check(feed_set: FeedSet, outputs: dict[str, dict[str, Any]]) -> DataCheck:
    checked = {}
    for name, seen in outputs.items():
        index = seen.pop("feed")
        where = feed_set.where[index] if index < len(feed_set.where) else None
        checked[name] = OutputCheck(name, seen["max_abs_diff"], seen["cosine_min"], seen["cosine_mean"], where)
    return DataCheck(feed_set.data, feed_set.source, len(feed_set.feeds), sample_count(feed_set.feeds), checked, feed_set.gated)


def _failures(verification: Verification, gates: Gates) -> list[str]:
    failures = []
    for tower, output in verification.gated_outputs():
        output.passed = (gates.min_cosine is None or output.cosine_min >= gates.min_cosine) and (gates.atol is None or output.max_abs_diff <= gates.atol)
        if gates.min_cosine is not None and output.cosine_min < gates.min_cosine:
            failures.append(
                f"{tower} tower: cosine min of {output.output} is {output.cosine_min:.6f}, "
                f"below --min-cosine {gates.min_cosine:g} by {gates.min_cosine - output.cosine_min:.2g}"
            )
        if gates.atol is not None and output.max_abs_diff > gates.atol:
            where = f" at {output.worst_at}" if output.worst_at else ""
            failures.append(f"{tower} tower: output '{output.output}' differs from the reference by {output.max_abs_diff:.3g} (> --atol {gates.atol:g}){where}")
    for metric in verification.metrics:
        if not metric.passed and metric.threshold is not None:
            side = "below" if metric.higher_is_better else "above"
            gate = metric.gate or "--min-agreement"
            failures.append(
                f"{metric.name} is {metric.value:.4g} ({metric.data}), {side} {gate} {metric.threshold:g} by {abs(metric.threshold - metric.value):.3g}"
            )
    return failures


# -- zero-shot agreement (dual encoders) ------------------------------------------------------------
def _zero_shot_probe(tower: Tower, data: EvalData | None) -> tuple[list[dict[str, np.ndarray]], str] | None:
    """The feeds a tower contributes to the zero-shot check: real photos or captions where the model has the processors,
    else synthetic images or prompts; for a one-graph dual encoder, its photos x captions (or synthetic) pairs."""
    max_seq = tower.vocab.max_length if tower.vocab else 1
    if tower.name == "model" and not any(spec.name == "logits_per_image" for spec in tower.outputs):
        return None
    if tower.name not in ("vision", "text", "model"):
        return None
    if tower.name != "model" and tower.outputs[0].name not in ("image_embeds", "text_embeds", "image_feat", "text_feat"):
        return None  # not a dual encoder's embedding (a LLaVA vision part's image features, a sentence encoder's)
    mine = data.for_tower(tower) if data is not None else None
    if mine is not None and mine.zero_shot:
        return mine.zero_shot, "real"
    if tower.name == "model":
        feed = make_inputs(tower, {"image_batch": ZERO_SHOT_IMAGES, "text_batch": ZERO_SHOT_PROMPTS, "sequence": min(16, max_seq)}, seed=7)
        return [feed], "synthetic"
    count = ZERO_SHOT_IMAGES if [spec.role for spec in tower.inputs] == ["image"] else ZERO_SHOT_PROMPTS
    return [make_inputs(tower, {"batch": count, "sequence": min(16, max_seq)}, seed=7)], "synthetic"


def _embed(run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    return np.concatenate([_first(run(feed)) for feed in feeds])


def _retrieval(
    reference: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    candidate: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    probe: tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]],
    gates: Gates,
) -> MetricCheck:
    """Each query ranks every passage: the fraction of queries whose top-1 passage is the reference's."""
    queries, passages = probe
    ref_top1 = top1(_embed(reference, queries), _embed(reference, passages))
    cand_top1 = top1(_embed(candidate, queries), _embed(candidate, passages))
    detail = {"queries": len(ref_top1), "passages": sample_count(passages), "reference_correct": float(np.mean(ref_top1 == np.arange(len(ref_top1))))}
    data = f"{len(ref_top1)} queries x {detail['passages']} passages (built-in, real)"
    return MetricCheck(RETRIEVAL, agreement(ref_top1, cand_top1), data, gates.min_agreement, detail=detail)


# -- classification agreement (image classifiers) ---------------------------------------------------
def _classification_probe(tower: Tower, data: EvalData | None) -> tuple[list[dict[str, np.ndarray]], str] | None:
    """An image classifier's photos (every real set: the built-in photos and the user's), else synthetic images."""
    if [spec.role for spec in tower.inputs] != ["image"] or [spec.name for spec in tower.outputs] != ["logits"]:
        return None
    real = data.for_tower(tower).real if data is not None else []
    if real:
        return [feed for s in real for feed in s.feeds], " + ".join(s.source for s in real)
    return [make_inputs(tower, {"batch": ZERO_SHOT_IMAGES}, seed=7)], "synthetic images"


def _classification(
    reference: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    candidate: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    probe: tuple[list[dict[str, np.ndarray]], str],
    gates: Gates,
) -> MetricCheck:
    """The fraction of images whose top-1 class is the reference's."""
    feeds, origin = probe
    ref_logits, cand_logits = _embed(reference, feeds), _embed(candidate, feeds)
    detail = {"images": len(ref_logits), "classes": int(ref_logits.shape[1])}
    data = f"{len(ref_logits)} images ({origin}) x {detail['classes']} classes"
    return MetricCheck(CLASSIFICATION, agreement(np.argmax(ref_logits, axis=1), np.argmax(cand_logits, axis=1)), data, gates.min_agreement, detail=detail)


def _zero_shot(towers: dict[str, Tower], picks: dict[str, tuple[Any, Any, str]], gates: Gates) -> list[MetricCheck]:
    if "vision" in picks and "text" in picks:
        (ref_images, cand_images, image_origin), (ref_texts, cand_texts, text_origin) = picks["vision"], picks["text"]
        value = agreement(top1(ref_images, ref_texts), top1(cand_images, cand_texts))
        detail = {"images": len(ref_images), "prompts": len(ref_texts)}
        data = f"{len(ref_images)} images ({image_origin}) x {len(ref_texts)} prompts ({text_origin})"
        return [MetricCheck(ZERO_SHOT, value, data, gates.min_agreement, detail=detail)]
    if "model" in picks:
        ref_logits, cand_logits, origin = picks["model"]
        value = agreement(np.argmax(ref_logits, axis=1), np.argmax(cand_logits, axis=1))
        images, prompts = ref_logits.shape
        data = f"{images} images x {prompts} prompts ({origin})"
        return [MetricCheck(ZERO_SHOT, value, data, gates.min_agreement, detail={"images": images, "prompts": prompts})]
    return []


def _first(outputs: dict[str, np.ndarray]) -> np.ndarray:
    """The tower's embedding: its `logits_per_image` for a monolith, else its only output."""
    return outputs.get("logits_per_image", next(iter(outputs.values())))
