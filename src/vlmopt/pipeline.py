"""Running a checked recipe (`vlmopt run`): each step through its stage's own `run`, the path the CLI takes,
then the recipe's gates.

A step's stage decides whether it is up to date (its options, its parent's content and its tools'
versions), so a step after one that made something new runs again because its input changed, and a
rerun of an unchanged recipe does nothing. A step that needs what this machine lacks (`Stage.requires`)
is skipped with that reason, and so is every later step that reads its artifact (`--strict`: it fails
instead). The first step that fails stops the run. `--dry-run` asks each stage why it would run
(`Stage.staleness`) and makes nothing.

The outcome of a run is written to `DIR/reports/run.json` (what ran, what failed, the gates), which
`vlmopt report` reads.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vlmopt.errors import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, EXIT_OK, CheckFailed, VlmoptError
from vlmopt.recipe import Gate, Recipe, Step
from vlmopt.stage import RunContext, StageResult
from vlmopt.stages.bench import REPORTS, latest_report
from vlmopt.workspace import MANIFEST_NAME, Artifact, ModelDir, write_atomically

RUN_SUMMARY = "run.json"
#: a step's status: made its artifact or report, found it up to date, was not run (and why), or failed; `will-run` in a dry run
STATUSES = ("ran", "up-to-date", "skipped", "failed", "will-run")


@dataclass
class StepOutcome:
    """What became of one step: its status, why, how long it took, and its stage's result."""

    step: Step
    status: str
    reason: str | None = None
    seconds: float | None = None
    result: StageResult | None = None

    def to_json(self, artifacts: dict[str, Artifact] | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {
            "step": self.step.number,
            "id": self.step.id,
            "stage": self.step.stage.name,
            "status": self.status,
            "reason": self.reason,
            "seconds": None if self.seconds is None else round(self.seconds, 2),
        }
        artifact = self.result.artifact if self.result is not None else (artifacts or {}).get(self.step.id)
        if artifact is not None:
            data["artifact"] = artifact_summary(artifact)
        if self.result is not None and self.result.report is not None:
            data["report"] = report_summary(self.result.report)
        return data


@dataclass
class GateOutcome:
    """One gate: the value found, and whether it passed (None: not checked, `reason` says why)."""

    gate: Gate
    value: float | None
    passed: bool | None
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "gate": self.gate.kind,
            "artifact": self.gate.artifact,
            "limit": self.gate.limit,
            "value": self.value,
            "passed": self.passed,
            "reason": self.reason,
        }


@dataclass
class RunResult:
    """A recipe's run: every step's outcome, the gates, and the exit code the CLI returns (0, 1 or 2) with its one-line `error`."""

    recipe: Recipe
    steps: list[StepOutcome]
    gates: list[GateOutcome] = field(default_factory=list)
    dry_run: bool = False
    exit_code: int = EXIT_OK
    error: str | None = None
    summary_file: str | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == EXIT_OK

    def to_json(self) -> dict[str, Any]:
        artifacts = _artifacts(self.recipe.model_dir)
        return {
            "ok": self.ok,
            "exit_code": self.exit_code,
            "error": self.error,
            "recipe": str(self.recipe.path),
            "model_dir": str(self.recipe.model_dir),
            "source": self.recipe.source,
            "dry_run": self.dry_run,
            "steps": [o.to_json(artifacts) for o in self.steps],
            "gates": [g.to_json() for g in self.gates] if not self.dry_run else [_planned_gate(g) for g in self.recipe.gates],
            "summary": self.summary_file,
        }


def artifact_summary(artifact: Artifact) -> dict[str, Any]:
    """What a reader wants of an artifact at a glance: kind, precision, size, worst gated cosine."""
    worst = artifact.verification.worst_cosine() if artifact.verification is not None else None
    return {
        "name": artifact.name,
        "kind": artifact.kind,
        "precision": artifact.traits.precision if artifact.kind != "hf" else None,
        "parent": artifact.parent,
        "size_mb": round(artifact.size / 2**20, 3),
        "towers": list(artifact.towers),
        "worst_cosine": worst,
        "verified": None if artifact.verification is None else artifact.verification.passed,
    }


def report_summary(report: dict[str, Any]) -> dict[str, Any]:
    speedups = [r["speedup"] for r in report.get("rows", []) if r.get("speedup") is not None and r["artifact"] != "hf"]
    return {
        "file": (report.get("files") or [None])[0],
        "rows": len(report.get("rows", [])),
        "artifacts": sorted({r["artifact"] for r in report.get("rows", [])}),
        "min_speedup": min(speedups) if speedups else None,
        "max_speedup": max(speedups) if speedups else None,
    }


def _planned_gate(gate: Gate) -> dict[str, Any]:
    return {"gate": gate.kind, "artifact": gate.artifact, "limit": gate.limit, "value": None, "passed": None, "reason": "dry run: not checked"}


def _artifacts(model_dir: Path) -> dict[str, Artifact]:
    if not (model_dir / MANIFEST_NAME).is_file():
        return {}
    try:
        return ModelDir(model_dir).load()
    except VlmoptError:
        return {}


# -- choosing steps --------------------------------------------------------------------------------
def _selected(recipe: Recipe, only: Iterable[str], from_step: str | None) -> tuple[set[str], str | None]:
    """The ids of the steps to run, and why the others are not."""
    only = list(only)
    if only and from_step:
        raise VlmoptError("--only and --from-step choose steps in two ways; give one of them")
    ids = [s.id for s in recipe.steps]
    if only:
        chosen = {recipe.step(selector).id for selector in only}
        return chosen, f"not selected (--only {' '.join(only)})"
    if from_step:
        start = ids.index(recipe.step(from_step).id)
        return set(ids[start:]), f"before --from-step {from_step}"
    return set(ids), None


# -- running --------------------------------------------------------------------------------------
def run_recipe(
    recipe: Recipe,
    *,
    dry_run: bool = False,
    only: Iterable[str] = (),
    from_step: str | None = None,
    force: Iterable[str] = (),
    strict: bool = False,
    threads: int | None = None,
    debug: bool = False,
    progress: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
    on_step: Callable[[StepOutcome], None] | None = None,
) -> RunResult:
    """Run (or with `dry_run`, plan) a checked recipe. Raises `VlmoptError` for bad selectors before any step runs;
    every other outcome, failures included, is in the returned `RunResult` (its `exit_code` is the CLI's)."""
    chosen, not_chosen = _selected(recipe, only, from_step)
    forced = {recipe.step(selector).id for selector in force}
    context_threads = threads if threads is not None else recipe.threads
    RunContext(threads=context_threads)  # checks --threads before anything runs
    say = progress or (lambda message: None)
    result = RunResult(recipe, [], dry_run=dry_run)
    #: artifacts this run will not make, and why (a skipped step's): later steps that read them are skipped too
    blocked: dict[str, str] = {}
    #: steps that (will) make something new: in a dry run, the steps reading them will run after them
    changing: set[str] = set()

    def record(outcome: StepOutcome) -> None:
        result.steps.append(outcome)
        if on_step is not None:
            on_step(outcome)

    for index, step in enumerate(recipe.steps, start=1):
        if step.id not in chosen:
            record(StepOutcome(step, "skipped", not_chosen))
            continue
        waiting = [name for name in step.reads if name in blocked]
        if waiting:
            blocked[step.id] = f"reads '{waiting[0]}', which this run does not make ({blocked[waiting[0]]})"
            record(StepOutcome(step, "skipped", blocked[step.id]))
            continue
        missing = step.stage.requires(step.options)
        if missing:
            if strict:
                record(StepOutcome(step, "failed", missing))
                result.exit_code, result.error = EXIT_BAD_INPUT, f"step {step.label}: {missing} (--strict)"
                break
            blocked[step.id] = missing
            record(StepOutcome(step, "skipped", missing))
            continue
        context = RunContext(
            force=step.id in forced,
            threads=context_threads,
            debug=debug,
            progress=lambda message, step=step, index=index: say(f"[{index}/{len(recipe.steps)}] {step.label}: {message}"),
            warn=warn or (lambda message: None),
        )
        if dry_run:
            outcome = _plan(recipe, step, context, changing)
            if outcome.status == "will-run":
                changing.add(step.id)
            record(outcome)
            continue
        started = time.perf_counter()
        try:
            if step.number == 0 and recipe.demo is not None:
                _build_demo(recipe, context)
            stage_result = step.stage.run(recipe.model_dir, step.options, context)
        except CheckFailed as exc:
            record(StepOutcome(step, "failed", exc.message, time.perf_counter() - started))
            result.exit_code, result.error = EXIT_CHECK_FAILED, f"step {step.label}: {exc.message}"
            break
        except VlmoptError as exc:
            record(StepOutcome(step, "failed", exc.message, time.perf_counter() - started))
            result.exit_code, result.error = EXIT_BAD_INPUT, f"step {step.label}: {exc.message}"
            break
        status = "up-to-date" if stage_result.skipped else "ran"
        record(StepOutcome(step, status, stage_result.reason if stage_result.skipped else None, time.perf_counter() - started, stage_result))

    reached = {o.step.id for o in result.steps}
    stopped_at = result.steps[-1].step.label if result.steps else ""
    for step in recipe.steps:
        if step.id not in reached:
            result.steps.append(StepOutcome(step, "skipped", f"not run: step {stopped_at} failed"))
    if not dry_run:
        if result.exit_code == EXIT_OK:
            result.gates = check_gates(recipe, result, blocked)
            failed = [g for g in result.gates if g.passed is False]
            if failed:
                result.exit_code = EXIT_CHECK_FAILED
                result.error = f"{len(failed)} gate(s) failed: " + "; ".join(g.reason or "" for g in failed)
        result.summary_file = write_summary(result)
    return result


def _plan(recipe: Recipe, step: Step, context: RunContext, changing: set[str]) -> StepOutcome:
    """Whether a step would run, and why: after a step that will run, or because its stage says it is not up to date."""
    after = [name for name in step.reads if name in changing]
    if step.number == 0 and recipe.demo is not None and not (recipe.demo.folder / "config.json").is_file():
        return StepOutcome(step, "will-run", f"the {recipe.demo.spec} checkpoint is not built yet ({recipe.demo.folder})")
    if after:
        return StepOutcome(step, "will-run", f"after {after[0]}")
    if context.force:
        return StepOutcome(step, "will-run", "forced (--force)")
    if not (recipe.model_dir / MANIFEST_NAME).is_file():
        return StepOutcome(step, "will-run", "not made yet")
    reason = step.stage.staleness(recipe.model_dir, step.options, context)
    return StepOutcome(step, "up-to-date" if reason is None else "will-run", reason or "inputs, options and tool versions unchanged")


def _build_demo(recipe: Recipe, context: RunContext) -> None:
    """Build the recipe's demo checkpoint once: into a temporary folder, renamed into place when whole."""
    from vlmopt.demo import build_demo_model

    demo = recipe.demo
    assert demo is not None
    if (demo.folder / "config.json").is_file():
        return
    context.progress(f"building the {demo.spec} checkpoint (random weights) in {demo.folder}")
    demo.folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{demo.folder.name}-", dir=demo.folder.parent))
    try:
        build_demo_model(tmp / "model", demo.family, demo.size)
        if demo.folder.exists():
            shutil.rmtree(demo.folder)
        (tmp / "model").rename(demo.folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- gates ----------------------------------------------------------------------------------------
def check_gates(recipe: Recipe, result: RunResult, blocked: dict[str, str]) -> list[GateOutcome]:
    """Each gate against what the model directory now records."""
    artifacts = _artifacts(recipe.model_dir)
    outcomes = {o.step.id: o for o in result.steps}
    report = latest_report(ModelDir(recipe.model_dir)) if (recipe.model_dir / MANIFEST_NAME).is_file() else None
    gates = []
    for gate in recipe.gates:
        artifact = artifacts.get(gate.artifact)
        if artifact is None:
            why = blocked.get(gate.artifact) or (outcomes[gate.artifact].reason if gate.artifact in outcomes else None) or "not made"
            gates.append(GateOutcome(gate, None, None, f"{gate.kind} {gate.artifact}: not made here ({why})"))
            continue
        gates.append(_gate(gate, artifact, report, blocked))
    return gates


def _gate(gate: Gate, artifact: Artifact, report: dict[str, Any] | None, blocked: dict[str, str]) -> GateOutcome:
    name, limit = gate.artifact, gate.limit
    if gate.kind == "max_size_mb":
        size = artifact.size / 2**20
        passed = size <= limit
        return GateOutcome(gate, round(size, 3), passed, f"max_size_mb {name}: {size:.1f} MB" + (f" > {limit:g} MB" if not passed else f" <= {limit:g} MB"))
    if gate.kind == "min_cosine":
        worst = artifact.verification.worst_cosine() if artifact.verification is not None else None
        if worst is None:
            return GateOutcome(gate, None, False, f"min_cosine {name}: no verification with a cosine is recorded")
        passed = worst >= limit
        return GateOutcome(gate, worst, passed, f"min_cosine {name}: worst cosine {worst:.6f}" + (f" < {limit:g}" if not passed else f" >= {limit:g}"))
    # min_speedup: the latest bench report's rows of this artifact, the slowest of them
    bench_blocked = blocked.get("bench")
    rows = [r for r in (report or {}).get("rows", []) if r["artifact"] == name and r.get("speedup") is not None]
    if not rows:
        why = bench_blocked or ("no bench report" if report is None else f"'{name}' is not in the latest bench report")
        return GateOutcome(gate, None, None if bench_blocked else False, f"min_speedup {name}: {why}")
    slowest = min(rows, key=lambda r: r["speedup"])
    value = slowest["speedup"]
    passed = value >= limit
    where = f"{slowest['tower']} at batch {slowest['batch']}"
    return GateOutcome(gate, round(value, 4), passed, f"min_speedup {name}: {value:.2f}x ({where})" + (f" < {limit:g}x" if not passed else f" >= {limit:g}x"))


# -- the run's summary ----------------------------------------------------------------------------
def write_summary(result: RunResult) -> str | None:
    """`DIR/reports/run.json`: this run's outcome for `vlmopt report`; only where a model directory exists."""
    model_dir = result.recipe.model_dir
    if not (model_dir / MANIFEST_NAME).is_file():
        return None
    folder = model_dir / REPORTS
    folder.mkdir(exist_ok=True)
    path = folder / RUN_SUMMARY
    result.summary_file = str(path)
    data = {**result.to_json(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_atomically(path, (json.dumps(data, indent=2, default=str) + "\n").encode())
    return str(path)


def read_summary(model_dir: Path) -> dict[str, Any] | None:
    """The last run's summary of a model directory, or None."""
    path = model_dir / REPORTS / RUN_SUMMARY
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
