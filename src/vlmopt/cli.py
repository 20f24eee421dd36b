"""The `vlmopt` command line: a thin typer layer over the stages.

Every stage's command is made from its declaration (`vlmopt.stage.Stage` and its options dataclass):
adding a stage adds its command with no edit here. Exit codes: 0 success, 1 a verification or
threshold check failed, 2 bad usage or bad input, 3 an internal error (a bug: rerun with --debug for
the traceback).
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vlmopt import __version__
from vlmopt.errors import EXIT_INTERNAL, CheckFailed, VlmoptError
from vlmopt.stages import STAGES

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


def _quiet_libraries(debug: bool) -> None:
    if debug:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def _emit_json(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")


def command(func: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command body with vlmopt's error contract: one line and an exit code, tracebacks only with --debug."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json, debug = kwargs.get("as_json", False), kwargs.get("debug", False)
        _quiet_libraries(debug)
        try:
            return func(*args, **kwargs)
        except VlmoptError as exc:
            if debug:
                raise
            if as_json:
                _emit_json({"ok": False, "error": exc.message, "exit_code": exc.exit_code, **(exc.details if isinstance(exc, CheckFailed) else {})})
            label = "check failed" if isinstance(exc, CheckFailed) else "error"
            err.print(f"[bold red]{label}:[/] {escape(exc.message)}", soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("[bold red]interrupted[/]: nothing was committed")
            raise typer.Exit(130) from None
        except typer.Exit:
            raise
        except Exception as exc:
            if debug:
                raise
            message = (str(exc).strip().splitlines() or [""])[0][:300]
            err.print(f"[bold red]internal error:[/] {type(exc).__name__}: {escape(message)} (rerun with --debug for the traceback)", soft_wrap=True)
            if as_json:
                _emit_json({"ok": False, "error": f"{type(exc).__name__}: {message}", "exit_code": EXIT_INTERNAL})
            raise typer.Exit(EXIT_INTERNAL) from None

    return wrapper


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
        out.print(renderable)


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
            for output in check.outputs.values():
                where = f" (worst at {', '.join(f'{k}={v}' for k, v in output.worst_at.items())})" if output.worst_at else ""
                table.add_row(
                    tower,
                    check.data,
                    output.output,
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
            f">= {metric.threshold:g}" if metric.threshold is not None else "report only",
            "[green]ok[/]" if metric.passed else "[red]FAIL[/]",
        )
    return table


for _stage in STAGES:
    app.command(_stage.name)(stage_command(_stage))


# -- demo-model ----------------------------------------------------------------------------
@app.command("demo-model")
@command
def demo_model(
    directory: Annotated[Path, typer.Argument(help="Where to write the Hugging Face model folder.", show_default=False)],
    family: Annotated[str, typer.Option(help="clip, siglip, vit, vit-classifier or bert.")] = "clip",
    size: Annotated[str, typer.Option(help="tiny (tests) or base (real sizes: CLIP ViT-B/32, ...).")] = "tiny",
    seed: Annotated[int, typer.Option(help="Random seed for the weights.")] = 0,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Build a demo checkpoint offline: a real architecture with random weights, tokenizer and image processor.

    Example: vlmopt demo-model build/clip-src --size base
    """
    from vlmopt.demo import build_demo_model

    with _status(f"building a {size} {family} with random weights", as_json):
        path = build_demo_model(directory, family, size, seed)
    files = sorted(p.name for p in path.iterdir())
    if as_json:
        _emit_json({"ok": True, "path": str(path), "family": family, "size": size, "files": files})
    else:
        out.print(f"[green]✓[/] demo {family} ({size}, random weights) written to [bold]{path}[/]: {', '.join(files)}")


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
    verify: Annotated[bool, typer.Option("--verify", help="Re-hash every file against the manifest (slower).")] = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """List the artifacts in a model directory: what made each, its size, verification, benchmark, and whether it is ok, modified or stale.

    Example: vlmopt info build/clip
    """
    from vlmopt.api import info as artifact_statuses

    model_dir, entries = artifact_statuses(directory, verify=verify)
    recommendation = model_dir.recommendation()
    current = {e.artifact.name: e.artifact.digest for e in entries}
    if as_json:
        payload: dict[str, Any] = {
            "ok": True,
            "path": str(model_dir.path),
            "artifacts": [{**e.artifact.to_json(), "size": e.artifact.size, "status": e.status} for e in entries],
        }
        if recommendation is not None:
            payload["recommendation"] = {
                **recommendation.to_json(),
                "stale": [c.artifact for c in recommendation.choices if c.artifact and current.get(c.artifact) != c.digest],
            }
        _emit_json(payload)
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


def _verified(artifact: Any) -> str:
    verification = artifact.verification
    if verification is None:
        return ""
    if verification.gates.get("min_cosine") is not None or verification.gates.get("atol") is None:
        worst = verification.worst_cosine()
        detail = f" (cosine min {worst:.4f})" if worst is not None else ""
    else:
        worst = verification.worst_abs_diff()
        detail = f" (max |diff| {worst:.1e})" if worst is not None else ""
    return ("passed" if verification.passed else "FAILED") + detail


def _best_speedup(artifact: Any) -> str:
    rows = (artifact.benchmark or {}).get("rows") or []
    speedups = [r["speedup"] for r in rows if r.get("speedup") is not None]
    return f"{max(speedups):.2f}x" if speedups and artifact.kind != "hf" else ""


def main() -> None:
    app()
