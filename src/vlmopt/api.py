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
from typing import TYPE_CHECKING, Any

from vlmopt.inventory import ArtifactStatus, info
from vlmopt.inventory import status as status  # re-exported: the rule `info`, recipes and reports share
from vlmopt.stage import RunContext, Stage, StageResult
from vlmopt.stages import STAGES

if TYPE_CHECKING:
    from vlmopt.comparison import Comparison
    from vlmopt.pipeline import RunResult
    from vlmopt.reporting import Report
    from vlmopt.stages.package import PackageResult

__all__ = ["ArtifactStatus", "StageResult", "compare", "info", "package", "report", "run", *(stage.name.replace("-", "_") for stage in STAGES)]


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


def package(
    directory: str | os.PathLike[str],
    triton: str | os.PathLike[str],
    *artifacts: str,
    backend: str = "native",
    onnx_backend: str = "onnxruntime",
    model_name: str | None = None,
    max_batch: int | None = None,
    max_queue_delay_us: int = 500,
    instances: int = 1,
    threads: int | None = None,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> PackageResult:
    """`vlmopt package DIR --triton OUT [ARTIFACT ...]`: write a Triton model repository (`.towers` says which artifact
    each tower got and why, `.models` the Triton models); bad input raises `VlmoptError` and writes nothing."""
    from pathlib import Path

    from vlmopt.stages.package import PackageOptions
    from vlmopt.stages.package import package as write_package

    options = PackageOptions(Path(triton), list(artifacts), backend, onnx_backend, model_name, max_batch, max_queue_delay_us, instances, threads)
    return write_package(directory, options, force=force, progress=progress or (lambda message: None))
