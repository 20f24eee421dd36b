"""The Python API: the same stages, option names and results as the CLI.

    import vlmopt
    vlmopt.export("build/clip-src", "build/clip")
    vlmopt.convert("build/clip")
    result = vlmopt.quantize("build/clip", mode="int8-static", calib_images="photos/", min_cosine=0.995)
    result.artifact.verification.worst_cosine()

    run = vlmopt.run("examples/recipes/clip-cpu.yaml")      # a recipe: RunResult (.ok, .exit_code, .steps, .gates)
    vlmopt.report("build/clip-cpu").markdown                  # the summary `vlmopt report` prints
    vlmopt.compare("baseline.json", "build/clip-cpu").ok      # `vlmopt compare`: False where it exits 1

Each stage function takes the model directory, then the stage's options by name (recipe keys such as
`from` work too, as `**{"from": "onnx-opt"}`; the Python field is `source`), then the run settings
`force`, `threads`, `progress` and `warn`. It returns a `StageResult`, raises `VlmoptError` for bad
input and `CheckFailed` when verification fails, exactly as the CLI exits 2 and 1.

`run`, `report` and `compare` take the same arguments as their commands and return what the commands print
(`to_json()` is their `--json`); bad input raises `VlmoptError` (exit 2), and a failed step, gate or comparison
is in the result (`ok` False, `exit_code` 1).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vlmopt.stage import RunContext, Stage, StageResult
from vlmopt.stages import STAGES
from vlmopt.workspace import Artifact, ModelDir, environment_changes

if TYPE_CHECKING:
    from vlmopt.comparison import Comparison
    from vlmopt.pipeline import RunResult
    from vlmopt.reporting import Report

__all__ = ["ArtifactStatus", "StageResult", "compare", "info", "report", "run", *(stage.name.replace("-", "_") for stage in STAGES)]


def _stage_function(stage: Stage) -> Callable[..., StageResult]:
    def run(
        directory: str | os.PathLike[str],
        *arguments: Any,
        force: bool = False,
        threads: int | None = None,
        progress: Callable[[str], None] | None = None,
        warn: Callable[[str], None] | None = None,
        **options: Any,
    ) -> StageResult:
        if stage.creates_directory and arguments:
            # export(SOURCE, DIR): the same order as `vlmopt export SOURCE -o DIR`
            directory, options["source"] = arguments[0], directory
        elif arguments:
            raise TypeError(f"{stage.name}() takes the model directory and options by name")
        context = RunContext(force=force, threads=threads, progress=progress or (lambda m: None), warn=warn or (lambda m: None))
        return stage.run(directory, stage.options(options), context)

    run.__name__ = stage.name.replace("-", "_")
    run.__doc__ = f"{stage.summary}\n\nOptions: " + ", ".join(f.name for f in stage.Options.__dataclass_fields__.values())
    return run


for _stage in STAGES:
    globals()[_stage.name.replace("-", "_")] = _stage_function(_stage)


@dataclass
class ArtifactStatus:
    """An artifact and its state: `ok`, `modified: ...` (files changed or missing) or `stale: ...` (why it would be re-made)."""

    artifact: Artifact
    status: str

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def status(model_dir: ModelDir, artifact: Artifact, artifacts: dict[str, Artifact], hashes: bool = False) -> str:
    """`ok`, `modified: ...` or `stale: ...`: the one rule `info`, recipes and reports share."""
    problems = model_dir.check_files(artifact, hashes=hashes)
    if problems:
        return "modified: " + "; ".join(problems)
    if artifact.parent is not None:
        parent = artifacts.get(artifact.parent)
        if parent is None:
            return f"stale: its parent '{artifact.parent}' is gone"
        if parent.digest != artifact.parent_digest:
            return f"stale: its parent '{artifact.parent}' changed"
    stage = next((s for s in STAGES if s.name == artifact.stage), None)
    if stage is not None and artifact.environment:
        changed = environment_changes(artifact.environment, {k: v for k, v in stage.environment(None).items() if k in artifact.environment})
        if changed:
            return "stale: made with " + ", ".join(changed)
    return "ok"


def info(directory: str | os.PathLike[str], verify: bool = False, warn: Callable[[str], None] | None = None) -> tuple[ModelDir, list[ArtifactStatus]]:
    """The model directory and each artifact with its status; `verify` re-hashes every file.

    First settles what a killed or interrupted command left (when no other vlmopt process holds the
    directory); `warn` hears why it could not."""
    model_dir = ModelDir.open(directory)
    unsettled = model_dir.try_recover()
    if unsettled and warn is not None:
        warn(f"an interrupted command left {model_dir.path} unsettled, and it cannot be settled now: {unsettled}")
    artifacts = model_dir.load()
    return model_dir, [ArtifactStatus(a, status(model_dir, a, artifacts, hashes=verify)) for a in artifacts.values()]


def run(
    recipe: str | os.PathLike[str],
    *,
    dry_run: bool = False,
    only: str | list[str] = (),
    from_step: str | None = None,
    force: str | list[str] = (),
    strict: bool = False,
    model_dir: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> RunResult:
    """`vlmopt run RECIPE`: check the whole recipe (raises `VlmoptError` naming file:line), then run or plan its steps.

    The result holds each step's outcome and the gates; `exit_code` is the command's (1 when a step's verification
    or a gate failed, 2 when a step was refused, e.g. with `strict` on a machine without TensorRT)."""
    from vlmopt.pipeline import run_recipe
    from vlmopt.recipe import load_recipe

    checked = load_recipe(recipe, model_dir=model_dir)
    return run_recipe(
        checked,
        dry_run=dry_run,
        only=[only] if isinstance(only, str) else list(only),
        from_step=from_step,
        force=[force] if isinstance(force, str) else list(force),
        strict=strict,
        threads=threads,
        progress=progress,
        warn=warn,
    )


def report(directory: str | os.PathLike[str], output: str | os.PathLike[str] | None = None) -> Report:
    """`vlmopt report DIR`: write summary.md and the PNG plots (into `output`, default DIR/reports/); the Markdown is `.markdown`."""
    from vlmopt.reporting import report as make_report

    return make_report(directory, output)


def compare(
    baseline: str | os.PathLike[str],
    current: str | os.PathLike[str],
    max_slowdown: float | str | None = "10%",
    max_cosine_drop: float | str | None = 0.001,
    max_size_growth: float | str | None = "10%",
) -> Comparison:
    """`vlmopt compare BASELINE CURRENT`: per artifact, tower and batch; `.ok` is False (the command exits 1) on a regression.

    Limits take what the flags take (`"10%"`, `0.1`, `"off"` or None)."""
    from vlmopt.comparison import compare as compare_reports

    return compare_reports(baseline, current, max_slowdown, max_cosine_drop, max_size_growth)
