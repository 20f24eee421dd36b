"""The `vlmopt` command line: a thin typer layer over the stages.

Exit codes: 0 success, 1 a verification or threshold check failed, 2 bad usage or bad input,
3 an internal error (a bug: rerun with --debug for the traceback).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
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
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo the stage even when its inputs and options are unchanged.")]
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


def _open_for_writing(path: Path):
    from vlmopt.workspace import ModelDir

    return ModelDir.open(path)


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


# -- export --------------------------------------------------------------------------------
@app.command()
@command
def export(
    source: Annotated[str, typer.Argument(help="A hub id (org/name) or a local Hugging Face model folder.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="The model directory to create or update.", show_default=False)],
    revision: Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit).")] = None,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Allow the checkpoint's own Python code to run (off by default).")] = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Save a checkpoint (safetensors weights, config, processor) into DIR/hf/.

    Example: vlmopt export build/clip-src -o build/clip
    """
    from vlmopt.hf import check_source
    from vlmopt.stages import export as stage
    from vlmopt.workspace import ModelDir

    check_source(source)
    new_directory = not output.exists()
    model_dir = ModelDir.create(output)
    try:
        with model_dir.lock(), _status(f"exporting {source}", as_json):
            result = stage.run(model_dir, stage.ExportOptions(source, revision, trust_remote_code), force=force)
    except BaseException:
        if new_directory and not model_dir.manifest_path.exists():
            shutil.rmtree(output, ignore_errors=True)
        raise
    _report_stage(result, model_dir, as_json)


# -- convert -------------------------------------------------------------------------------
@app.command()
@command
def convert(
    directory: DirArg,
    source: Annotated[str, typer.Option("--from", help="The Hugging Face artifact to convert.")] = "hf",
    name: Annotated[str, typer.Option("--name", help="Name of the ONNX artifact to write.")] = "onnx",
    monolith: Annotated[bool, typer.Option("--monolith", help="One graph with both towers and the zero-shot logits.")] = False,
    static: Annotated[bool, typer.Option("--static", help="Fixed shapes instead of dynamic batch/sequence axes.")] = False,
    batch_size: Annotated[int, typer.Option(help="Batch size of a --static export.")] = 1,
    seq_len: Annotated[int | None, typer.Option(help="Sequence length of a --static export (default: the model's maximum).")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset (17..23).")] = 18,
    atol: Annotated[float | None, typer.Option(help="Largest accepted |PyTorch - ONNX Runtime| per output (default: the family's).")] = None,
    exporter: Annotated[str, typer.Option(help="auto (TorchScript below 2 GB of weights, dynamo above), dynamo or torchscript.")] = "auto",
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Export each tower to ONNX (dynamic batch/sequence axes) and verify it against PyTorch.

    Fails with exit 1, writing nothing, when an output differs by more than --atol.
    Example: vlmopt convert build/clip
    """
    from vlmopt.stages import convert as stage

    options = stage.ConvertOptions(source, name, monolith, static, batch_size, seq_len, opset, atol, exporter)
    options.validate()
    model_dir = _open_for_writing(directory)
    with model_dir.lock(), _status("converting to ONNX", as_json) as status:
        result = stage.run(model_dir, options, force=force, debug=debug, progress=status.update)
    _report_stage(result, model_dir, as_json)


# -- optimize ------------------------------------------------------------------------------
@app.command()
@command
def optimize(
    directory: DirArg,
    source: Annotated[str, typer.Option("--from", help="The fp32 ONNX artifact to optimize.")] = "onnx",
    name: Annotated[str, typer.Option("--name", help="Name of the optimized artifact.")] = "onnx-opt",
    attention: Annotated[bool, typer.Option("--attention/--no-attention", help="Fuse attention blocks into ONNX Runtime's Attention op.")] = True,
    model_type: Annotated[str | None, typer.Option(help="ONNX Runtime optimizer model type (default: the family's per tower).")] = None,
    atol: Annotated[float, typer.Option(help="Largest accepted |fused - unfused| per output.")] = 1e-3,
    min_cosine: Annotated[float, typer.Option(help="Smallest accepted cosine between fused and unfused outputs.")] = 0.9999,
    threads: Annotated[int | None, typer.Option(help="Threads for verification (default: physical cores).")] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Fuse Attention, SkipLayerNormalization and Gelu with ONNX Runtime's transformer optimizer; verify against the unfused graph.

    Example: vlmopt optimize build/clip
    """
    from vlmopt.stages import optimize as stage

    options = stage.OptimizeOptions(source, name, attention, model_type, atol, min_cosine)
    options.validate()
    model_dir = _open_for_writing(directory)
    with model_dir.lock(), _status("optimizing", as_json) as status:
        result = stage.run(model_dir, options, force=force, debug=debug, progress=status.update, threads=threads or _cores())
    _report_stage(result, model_dir, as_json)


# -- quantize ------------------------------------------------------------------------------
def _names(values: list[str] | None) -> list[str]:
    """Repeatable options that also take comma-separated lists."""
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


@app.command()
@command
def quantize(
    directory: DirArg,
    mode: Annotated[str, typer.Option(help="fp16, int8-dynamic, int8-static or int4 (bf16 is refused: no ONNX Runtime CPU kernels).")] = "int8-dynamic",
    source: Annotated[str, typer.Option("--from", help="The fp32 ONNX artifact to quantize (onnx, onnx-opt, ...).")] = "onnx",
    name: Annotated[str | None, typer.Option("--name", help="Name of the artifact (default: the mode, int8-static-trt for TensorRT).")] = None,
    target: Annotated[str, typer.Option(help="cpu, or tensorrt: symmetric INT8 Q/DQ on MatMul/Gemm only, float bias.")] = "cpu",
    per_channel: Annotated[bool, typer.Option("--per-channel", help="INT8 weights with one scale per output channel.")] = False,
    reduce_range: Annotated[bool, typer.Option("--reduce-range", help="7-bit INT8 weights (for CPUs without VNNI).")] = False,
    calib_images: Annotated[Path | None, typer.Option(help="int8-static: a folder of jpg/png images for calibration.")] = None,
    calib_text: Annotated[Path | None, typer.Option(help="int8-static: a text file, one prompt a line, for calibration.")] = None,
    calib_samples: Annotated[int, typer.Option(help="Most calibration samples per tower (synthetic ones too).")] = 64,
    calib_method: Annotated[str, typer.Option(help="int8-static range estimation: minmax, entropy or percentile.")] = "minmax",
    percentile: Annotated[float, typer.Option(help="Percentile for --calib-method percentile.")] = 99.999,
    block_size: Annotated[int, typer.Option(help="int4: weights per quantization block (power of two, >= 16).")] = 32,
    accuracy_level: Annotated[int, typer.Option(help="int4: MatMulNBits compute (0 fp32 ... 4 int8).")] = 4,
    op_types: Annotated[list[str] | None, typer.Option("--op-types", help="Only quantize these op types (repeatable or comma-separated).")] = None,
    exclude_op_types: Annotated[list[str] | None, typer.Option("--exclude-op-types", help="Never quantize these op types (fp16: keep them in fp32).")] = None,
    nodes: Annotated[list[str] | None, typer.Option("--nodes", help="Only quantize these nodes (by name).")] = None,
    exclude_nodes: Annotated[list[str] | None, typer.Option("--exclude-nodes", help="Never quantize these nodes (by name).")] = None,
    keep_io_types: Annotated[bool, typer.Option("--keep-io-types/--fp16-io", help="fp16: keep graph inputs and outputs fp32.")] = True,
    min_cosine: Annotated[float, typer.Option(help="Fail (exit 1, nothing written) below this cosine to the fp32 parent; 0 turns it off.")] = 0.99,
    min_agreement: Annotated[float | None, typer.Option(help="Fail below this zero-shot top-1 agreement with the fp32 parent (dual encoders).")] = None,
    threads: Annotated[int | None, typer.Option(help="Threads for calibration and verification (default: physical cores).")] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Make an fp16, INT8 or INT4 variant of an fp32 ONNX artifact and verify it against that artifact.

    Fails with exit 1, writing nothing, when the cosine or zero-shot agreement falls below the thresholds.
    Example: vlmopt quantize build/clip --mode int8-static --calib-images photos/ --calib-text prompts.txt
    """
    from vlmopt.stages import quantize as stage

    options = stage.QuantizeOptions(
        mode=mode,
        source=source,
        output=name,
        target=target,
        per_channel=per_channel,
        reduce_range=reduce_range,
        calib_images=str(calib_images) if calib_images else None,
        calib_text=str(calib_text) if calib_text else None,
        calib_samples=calib_samples,
        calib_method=calib_method,
        percentile=percentile,
        block_size=block_size,
        accuracy_level=accuracy_level,
        op_types=_names(op_types),
        exclude_op_types=_names(exclude_op_types),
        nodes=_names(nodes),
        exclude_nodes=_names(exclude_nodes),
        keep_io_types=keep_io_types,
        min_cosine=min_cosine or None,
        min_agreement=min_agreement,
    )
    options.validate()
    model_dir = _open_for_writing(directory)

    with model_dir.lock(), _status(f"quantizing ({mode})", as_json) as status:
        result = stage.run(model_dir, options, force=force, debug=debug, progress=status.update, warn=_warn, threads=threads or _cores())
    _report_stage(result, model_dir, as_json)


# -- prune ---------------------------------------------------------------------------------
@app.command()
@command
def prune(
    directory: DirArg,
    mlp_ratio: Annotated[float, typer.Option(help="Fraction of MLP hidden neurons to remove in every block, in [0, 1).")] = 0.0,
    head_ratio: Annotated[float, typer.Option(help="Fraction of attention heads to remove in every block (models whose config carries head_dim: ViT).")] = 0.0,
    score: Annotated[str, typer.Option(help="Ranking: l1 or l2 weight magnitude, or activation (calibration data).")] = "l2",
    sparsity: Annotated[float, typer.Option(help="Then zero this fraction of the remaining weights (magnitude).")] = 0.0,
    pattern: Annotated[str, typer.Option(help="unstructured, or 2:4 (2 of every 4 input weights kept; TensorRT sparse kernels).")] = "unstructured",
    scope: Annotated[str, typer.Option(help="--sparsity per layer, or global (one threshold over all layers).")] = "layer",
    tower: Annotated[list[str] | None, typer.Option(help="Only these towers (repeatable).")] = None,
    source: Annotated[str, typer.Option("--from", help="The Hugging Face artifact to prune.")] = "hf",
    name: Annotated[str, typer.Option("--name", help="Name of the pruned artifact.")] = "hf-pruned",
    calib_images: Annotated[Path | None, typer.Option(help="--score activation: a folder of jpg/png images.")] = None,
    calib_text: Annotated[Path | None, typer.Option(help="--score activation: a text file, one prompt a line.")] = None,
    calib_samples: Annotated[int, typer.Option(help="Most calibration samples per tower.")] = 32,
    min_cosine: Annotated[float | None, typer.Option(help="Fail (exit 1, nothing written) below this cosine to the unpruned model.")] = None,
    min_agreement: Annotated[float | None, typer.Option(help="Fail below this zero-shot top-1 agreement with the unpruned model.")] = None,
    threads: Annotated[int | None, typer.Option(help="Threads (default: physical cores).")] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Shrink the model: remove MLP neurons and attention heads (a smaller checkpoint that reloads with from_pretrained),
    and/or zero weights by magnitude or in a 2:4 pattern. Without fine-tuning, pruning loses accuracy: the report says how much.

    Example: vlmopt prune build/clip --mlp-ratio 0.3
    """
    from vlmopt.stages import prune as stage

    options = stage.PruneOptions(
        source=source,
        output=name,
        mlp_ratio=mlp_ratio,
        head_ratio=head_ratio,
        score=score,
        sparsity=sparsity,
        pattern=pattern,
        scope=scope,
        towers=list(tower) if tower else None,
        calib_images=str(calib_images) if calib_images else None,
        calib_text=str(calib_text) if calib_text else None,
        calib_samples=calib_samples,
        min_cosine=min_cosine,
        min_agreement=min_agreement,
    )
    options.validate()
    model_dir = _open_for_writing(directory)

    with model_dir.lock(), _status("pruning", as_json) as status:
        result = stage.run(model_dir, options, force=force, progress=status.update, warn=_warn, threads=threads or _cores())
    _report_stage(result, model_dir, as_json)
    if not as_json:
        _print_pruning(result.artifact)


def _si(value: float) -> str:
    for factor, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= factor:
            return f"{value / factor:.2f} {unit}"
    return f"{value:.0f}"


def _print_pruning(artifact: Any) -> None:
    table = Table(title="pruning (no fine-tuning: expect accuracy loss; fine-tune before deploying)", title_justify="left")
    for column in ("tower", "MLP neurons", "heads", "parameters", "FLOPs / item", "sparsity"):
        table.add_column(column, justify="left" if column == "tower" else "right")
    for tower, r in artifact.towers.items():
        mlp = f"{r['mlp']['before']} -> {r['mlp']['after']}" if "mlp" in r else ""
        heads = f"{r['heads']['before']} -> {r['heads']['after']}" if "heads" in r else ""
        params = f"{r['parameters_before']:,} -> {r['parameters_after']:,}"
        flops = f"{_si(r['flops_before'])} -> {_si(r['flops_after'])} ({r['flops_after'] / r['flops_before']:.0%})"
        sparse = r.get("sparsity")
        sparsity = f"{sparse['pattern']} {sparse['achieved']:.1%}" if sparse else ""
        table.add_row(tower, mlp, heads, params, flops, sparsity)
    out.print(table)


def _warn(message: str) -> None:
    """What the user must not miss (synthetic calibration): a yellow line on stderr, also under --json."""
    err.print(f"[bold yellow]warning:[/] {escape(message)}", soft_wrap=True)


def _cores() -> int:
    from vlmopt.stages.bench import _physical_cores

    return _physical_cores()


def _report_stage(result: Any, model_dir: Any, as_json: bool) -> None:
    artifact = result.artifact
    if as_json:
        _emit_json({"ok": True, **result.to_json()})
        return
    verb = "up to date, skipped" if result.skipped else "written"
    out.print(f"[green]✓[/] {artifact.name} ({artifact.kind}, {artifact.size / 2**20:.1f} MB) {verb}: {model_dir.artifact_path(artifact.name)}")
    verification = artifact.verification
    if verification and verification.get("towers"):
        out.print(_verification_table(verification))
    sizes = [(t, r["parent_size"], r["size"]) for t, r in artifact.towers.items() if "parent_size" in r]
    if sizes:
        out.print("size: " + "; ".join(f"{t} {before / 2**20:.1f} MB -> {after / 2**20:.1f} MB ({after / before:.0%})" for t, before, after in sizes))
    fused = [(t, r["fused"], r.get("attention_layers")) for t, r in artifact.towers.items() if "fused" in r]
    for tower, counts, layers in fused:
        attention = counts.get("Attention", 0) + counts.get("MultiHeadAttention", 0)
        out.print(f"fused in {tower}: attention {attention}/{layers} layers; " + ", ".join(f"{op} {n}" for op, n in counts.items()))
    ready = {t: r.get("tensorrt_issue") for t, r in artifact.towers.items() if "tensorrt_ready" in r}
    if ready and artifact.meta.get("target") == "tensorrt":
        for tower, issue in ready.items():
            out.print(f"TensorRT (strongly typed): {tower} " + ("[green]ready[/]" if issue is None else f"[red]not ready[/]: {issue}"))
    for tower, info in (artifact.meta.get("calibration") or {}).items():
        label = "[bold yellow]SYNTHETIC[/]" if info["data"] == "synthetic" else "real"
        out.print(f"calibration of {tower}: {info['samples']} {label} samples, {info['method']}")


def _verification_table(verification: dict[str, Any]) -> Table:
    """One row per tower output: convert's tolerance check against PyTorch, or a variant's check against its fp32 parent."""
    table = Table(title=f"verification against {verification['reference']}", title_justify="left")
    threshold = verification.get("min_cosine")
    for column in ("tower", "output", "inputs", "max |diff|", "cosine mean", "cosine min", "threshold", ""):
        table.add_column(column, justify="right" if column not in ("tower", "output", "inputs", "") else "left")
    for tower, result in verification["towers"].items():
        if "shapes" in result:
            inputs = "; ".join(", ".join(f"{k}={v}" for k, v in s.items()) for s in result["shapes"])
        else:
            inputs = f"{result['feeds']} batches, {result['data']}"
        for output, r in result["outputs"].items():
            if "atol" in result:
                ok, limit = r["max_abs_diff"] <= result["atol"], f"atol {result['atol']:.0e}"
            else:
                ok = (threshold is None or r["cosine_min"] >= threshold) and (verification.get("atol") is None or r["max_abs_diff"] <= verification["atol"])
                limit = f"cos >= {threshold:g}" if threshold is not None else ""
            mean = r.get("cosine_mean")
            table.add_row(
                tower,
                output,
                inputs,
                f"{r['max_abs_diff']:.2e}",
                f"{mean:.6f}" if mean is not None else "",
                f"{r['cosine_min']:.6f}",
                limit,
                "[green]ok[/]" if ok else "[red]FAIL[/]",
            )
    zero_shot = verification.get("zero_shot")
    if zero_shot:
        limit = verification.get("min_agreement")
        ok = limit is None or zero_shot["agreement"] >= limit
        table.add_row(
            "zero-shot",
            "top-1 agreement",
            f"{zero_shot['images']} images x {zero_shot['prompts']} prompts ({zero_shot['data']})",
            "",
            "",
            f"{zero_shot['agreement']:.3f}",
            f">= {limit:g}" if limit is not None else "report only",
            "[green]ok[/]" if ok else "[red]FAIL[/]",
        )
    return table


# -- bench ---------------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise VlmoptError(f"--batch takes comma-separated integers like 1,8,32, got '{text}'") from None
    if not values or any(v < 1 for v in values):
        raise VlmoptError(f"--batch takes positive integers like 1,8,32, got '{text}'")
    return values


@app.command()
@command
def bench(
    directory: DirArg,
    artifacts: Annotated[
        list[str] | None,
        typer.Argument(help="Artifacts to run (default: every runnable one); the PyTorch reference `hf` is always included.", show_default=False),
    ] = None,
    batch: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8",
    seq_len: Annotated[int | None, typer.Option(help="Text sequence length (default: the tower's usual length, e.g. 77 for CLIP).")] = None,
    tower: Annotated[list[str] | None, typer.Option(help="Only these towers (repeatable): vision, text, model.")] = None,
    warmup: Annotated[int, typer.Option(help="Untimed runs before measuring.")] = 3,
    iterations: Annotated[int, typer.Option(help="Timed runs per measurement.")] = 20,
    duration: Annotated[float | None, typer.Option(help="Seconds per measurement instead of a fixed --iterations.")] = None,
    threads: Annotated[int | None, typer.Option(help="Intra-op threads for every backend (default: physical cores).")] = None,
    min_speedup: Annotated[float | None, typer.Option(help="Exit 1 when any artifact is slower than this multiple of PyTorch.")] = None,
    torch_attention: Annotated[str, typer.Option(help="Attention of the PyTorch reference: sdpa (its fastest) or eager.")] = "sdpa",
    device: Annotated[str, typer.Option(help="cpu, or cuda: PyTorch fp32/fp16 on the GPU, ONNX Runtime's CUDA provider, TensorRT engines.")] = "cpu",
    cuda_graphs: Annotated[bool, typer.Option("--cuda-graphs", help="Replay TensorRT engines from captured CUDA graphs (--device cuda).")] = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Measure latency (mean/p50/p90/p99), throughput, memory and speed-up against PyTorch.

    Writes DIR/reports/bench-<time>.json and .md and records the results in the manifest.
    Example: vlmopt bench build/clip --batch 1,8
    """
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from vlmopt.stages import bench as stage

    options = stage.BenchOptions(
        artifacts=list(artifacts or []),
        batches=_int_list(batch),
        seq_len=seq_len,
        towers=list(tower or []),
        warmup=warmup,
        iterations=iterations,
        duration=duration,
        threads=threads,
        min_speedup=min_speedup,
        attn_implementation=torch_attention,
        device=device,
        cuda_graphs=cuda_graphs,
    )
    options.validate()
    model_dir = _open_for_writing(directory)
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed} measured"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=as_json,
    )
    with model_dir.lock(), progress:
        task = progress.add_task("benchmarking", total=None)

        def advance(message: str, step: int) -> None:
            progress.update(task, description=message, advance=step)

        try:
            report = stage.run(model_dir, options, progress=advance)
        except CheckFailed as exc:
            progress.stop()
            if not as_json and "report" in exc.details:
                _print_bench(exc.details["report"])
            raise
    if as_json:
        _emit_json({"ok": True, **report})
    else:
        _print_bench(report)


def _print_bench(report: dict[str, Any]) -> None:
    settings = report["settings"]
    measure = f"{settings['duration']:g} s" if settings["duration"] else f"{settings['iterations']} iterations"
    table = Table(title=f"vlmopt bench · {report['machine']['threads']} threads · warm-up {settings['warmup']} · {measure}", title_justify="left")
    gpu = any(r.get("gpu_memory_mb") is not None for r in report["rows"])
    columns = (
        "artifact",
        "backend",
        "tower",
        "batch",
        "seq",
        "mean ms",
        "p50",
        "p90",
        "p99",
        "items/s",
        "Δ RSS MB",
        *(("GPU MB",) if gpu else ()),
        "size MB",
        "speed-up",
        "cosine min",
    )
    for column in columns:
        table.add_column(column, justify="left" if column in ("artifact", "backend", "tower") else "right")
    for r in report["rows"]:
        lat = r["latency_ms"]
        speedup = r["speedup"]
        style = "" if speedup is None else ("green" if speedup >= 1 else "red")
        table.add_row(
            r["artifact"],
            r["backend"],
            r["tower"],
            str(r["batch"]),
            str(r["sequence"] or ""),
            f"{lat['mean']:.2f}",
            f"{lat['p50']:.2f}",
            f"{lat['p90']:.2f}",
            f"{lat['p99']:.2f}",
            f"{r['throughput']:.1f}",
            f"{r['peak_rss_mb']:.0f}",
            *((f"{r['gpu_memory_mb']:.0f}" if r.get("gpu_memory_mb") is not None else "",) if gpu else ()),
            f"{r['size_mb']:.1f}",
            f"[{style}]{speedup:.2f}x[/]" if speedup is not None else "",
            f"{r['cosine_min']:.6f}" if r["cosine_min"] is not None else "",
        )
    out.print(table)
    for skip in report.get("skipped", []):
        out.print(f"[yellow]not measured:[/] {skip['artifact']} {skip['tower']} at batch {skip['batch']}: {skip['reason']}")
    files = report.get("files")
    if files:
        out.print(f"reports: {', '.join(files)}")


# -- build ---------------------------------------------------------------------------------
@app.command()
@command
def build(
    directory: DirArg,
    source: Annotated[str, typer.Option("--from", help="The ONNX artifact to build: onnx (fp32), fp16 or int8-static-trt.")] = "onnx",
    name: Annotated[str | None, typer.Option("--name", help="Name of the engine artifact (default: trt-<from>).")] = None,
    opt_batch: Annotated[int, typer.Option(help="Batch size the engine is tuned for.")] = 8,
    max_batch: Annotated[int, typer.Option(help="Largest batch the engine takes (the smallest is 1).")] = 32,
    max_seq: Annotated[int | None, typer.Option(help="Longest text the engine takes (default: the model's maximum).")] = None,
    shapes: Annotated[list[str] | None, typer.Option("--shapes", help="Override an input's profile: name:MIN,OPT,MAX, e.g. input_ids:1x77,8x77,32x77.")] = None,
    workspace: Annotated[int, typer.Option(help="Builder workspace limit in MiB.")] = 4096,
    optimization_level: Annotated[int, typer.Option(help="Builder optimization level 0..5 (higher: longer builds, faster engines).")] = 3,
    timing_cache: Annotated[bool, typer.Option("--timing-cache/--no-timing-cache", help="Keep and reuse a timing cache in DIR/timing-caches/.")] = True,
    hardware_compatibility: Annotated[str, typer.Option(help="none, ampere+ (runs on any GPU of compute capability >= 8.0) or same-cc.")] = "none",
    version_compatible: Annotated[bool, typer.Option("--version-compatible", help="An engine later TensorRT releases of this major can load.")] = False,
    sparse_weights: Annotated[str, typer.Option(help="auto (on for artifacts pruned to 2:4), on or off.")] = "auto",
    min_cosine: Annotated[float, typer.Option(help="Fail (exit 1, nothing written) below this cosine to ONNX Runtime; 0 turns it off.")] = 0.99,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Build strongly typed TensorRT engines (10.x and 11.x) from an ONNX artifact that carries its precision; verify them against ONNX Runtime.

    Needs TensorRT (pip install 'vlmopt\\[tensorrt]') and a CUDA GPU; without either it says which and exits 2.
    Example: vlmopt build build/clip --from fp16
    """
    from vlmopt.stages import build as stage

    options = stage.BuildOptions(
        source=source,
        output=name,
        opt_batch=opt_batch,
        max_batch=max_batch,
        max_seq=max_seq,
        shapes=list(shapes or []),
        workspace_mb=workspace,
        optimization_level=optimization_level,
        timing_cache=timing_cache,
        hardware_compatibility=hardware_compatibility,
        version_compatible=version_compatible,
        sparse_weights=sparse_weights,
        min_cosine=min_cosine or None,
    )
    options.validate()
    model_dir = _open_for_writing(directory)
    with model_dir.lock(), _status("building TensorRT engines", as_json) as status:
        result = stage.run(model_dir, options, force=force, progress=status.update)
    _report_stage(result, model_dir, as_json)


# -- doctor --------------------------------------------------------------------------------
@app.command()
@command
def doctor(
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """What this machine can do: torch and CUDA, GPUs, ONNX Runtime providers, TensorRT, and which stages are usable.

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
    out.print(table)
    stage_table = Table(title="stages", title_justify="left")
    for column in ("stage", "usable here", "needs"):
        stage_table.add_column(column)
    for row in stages:
        stage_table.add_row(row["stage"], "[green]yes[/]" if row["usable"] == "yes" else "[red]no[/]", escape(row["needs"]))
    out.print(stage_table)


# -- info ----------------------------------------------------------------------------------
@app.command()
@command
def info(
    directory: DirArg,
    verify: Annotated[bool, typer.Option("--verify", help="Re-hash every file against the manifest (slower).")] = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """List the artifacts in a model directory: what made each, its size, verification and benchmark.

    Example: vlmopt info build/clip
    """
    from vlmopt.workspace import ModelDir

    model_dir = ModelDir.open(directory)
    artifacts = model_dir.load()
    entries = []
    for artifact in artifacts.values():
        problems = model_dir.check_files(artifact, hashes=verify)
        parent = artifacts.get(artifact.parent) if artifact.parent else None
        stale = artifact.parent is not None and (parent is None or parent.digest != artifact.parent_digest)
        status = "modified: " + "; ".join(problems) if problems else ("stale (parent changed)" if stale else "ok")
        entries.append((artifact, status))
    if as_json:
        _emit_json({"ok": True, "path": str(model_dir.path), "artifacts": [{**a.to_json(), "size": a.size, "status": s} for a, s in entries]})
        return
    table = Table(title=f"{model_dir.path}", title_justify="left")
    for column in ("artifact", "kind", "stage", "from", "towers", "size MB", "verified", "best speed-up", "created", "status"):
        table.add_column(column, justify="right" if column == "size MB" else "left")
    for artifact, status in entries:
        table.add_row(
            artifact.name,
            artifact.kind + (f" {artifact.meta['precision']}" if artifact.meta.get("precision") else ""),
            artifact.stage,
            artifact.parent or artifact.meta.get("source", ""),
            ", ".join(artifact.towers) or artifact.meta.get("family", ""),
            f"{artifact.size / 2**20:.1f}",
            _verified(artifact),
            _best_speedup(artifact),
            artifact.created.replace("+00:00", "Z"),
            status if status == "ok" else f"[red]{status}[/]",
        )
    out.print(table)


def _verified(artifact: Any) -> str:
    verification = artifact.verification
    if not verification:
        return ""
    outputs = [r for t in verification.get("towers", {}).values() for r in t["outputs"].values()]
    if "min_cosine" in verification and outputs:
        worst = f" (cosine min {min(r['cosine_min'] for r in outputs):.4f})"
    else:
        worst = f" (max |diff| {max(r['max_abs_diff'] for r in outputs):.1e})" if outputs else ""
    return ("passed" if verification.get("passed") else "FAILED") + worst


def _best_speedup(artifact: Any) -> str:
    rows = (artifact.benchmark or {}).get("rows") or []
    speedups = [r["speedup"] for r in rows if r.get("speedup") is not None]
    return f"{max(speedups):.2f}x" if speedups and artifact.kind != "hf" else ""


def main() -> None:
    app()
