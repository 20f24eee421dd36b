"""`vlmopt convert`: Hugging Face → ONNX, one graph per tower, verified against PyTorch before it is kept."""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlmopt.errors import CheckFailed, VlmoptError
from vlmopt.families import Tower, family_for
from vlmopt.hf import load_config, load_model
from vlmopt.inputs import export_sizes, make_inputs, verification_sizes
from vlmopt.runners import OrtRunner, TorchRunner
from vlmopt.verify import compare_feeds
from vlmopt.workspace import ModelDir, StageOutput, StageResult

MIN_OPSET, MAX_OPSET = 17, 23
EXPORTERS = ("auto", "dynamo", "torchscript")
#: protobuf's limit: a larger graph must keep its weights as external data, which only the dynamo path writes
_SINGLE_FILE_LIMIT = 2**31 - 2**26


@dataclass
class ConvertOptions:
    source: str = "hf"
    output: str = "onnx"
    monolith: bool = False
    static: bool = False
    batch_size: int = 1
    seq_len: int | None = None
    opset: int = 18
    atol: float | None = None
    exporter: str = "auto"

    def validate(self) -> None:
        if self.exporter not in EXPORTERS:
            raise VlmoptError(f"--exporter must be one of {', '.join(EXPORTERS)}, got '{self.exporter}'")
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise VlmoptError(f"--opset {self.opset} is outside the supported range {MIN_OPSET}..{MAX_OPSET}")
        if self.batch_size < 1:
            raise VlmoptError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.seq_len is not None and self.seq_len < 1:
            raise VlmoptError(f"--seq-len must be at least 1, got {self.seq_len}")
        if self.atol is not None and not self.atol > 0:
            raise VlmoptError(f"--atol must be positive, got {self.atol}")
        if not self.static and (self.batch_size != 1 or self.seq_len is not None):
            raise VlmoptError("--batch-size and --seq-len fix the shapes of a --static export; add --static or drop them")


@contextlib.contextmanager
def quiet_exporter(debug: bool) -> Iterator[io.StringIO]:
    """The exporter narrates every step on stdout and warns freely; keep that for --debug."""
    log = io.StringIO()
    if debug:
        yield log
        return
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log):
            warnings.simplefilter("ignore")
            yield log
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _static_sizes(tower: Tower, options: ConvertOptions) -> dict[str, int]:
    max_seq = tower.vocab.max_length if tower.vocab else 1
    seq_len = options.seq_len or max_seq
    if tower.vocab and seq_len > max_seq:
        raise VlmoptError(f"--seq-len {seq_len} is longer than the model's {max_seq} positions")
    batch = options.batch_size
    return {"batch": batch, "image_batch": batch, "text_batch": batch, "sequence": seq_len}


def choose_exporter(requested: str, module: Any) -> str:
    """`auto` takes the TorchScript exporter (3x faster here, same verified numbers) while the
    tower's weights fit one protobuf file, and the dynamo exporter, which writes external data, beyond."""
    if requested != "auto":
        return requested
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    return "torchscript" if weight_bytes < _SINGLE_FILE_LIMIT else "dynamo"


def export_tower(module: Any, tower: Tower, path: Path, opset: int, dynamic: bool, exporter: str = "dynamo", debug: bool = False) -> None:
    """Export one wrapped tower to `path`, naming every dynamic axis (`tower`'s string axes)."""
    import torch

    feed = make_inputs(tower, export_sizes(tower))
    args = tuple(torch.from_numpy(feed[spec.name]) for spec in tower.inputs)
    axes = {spec.name: spec.dynamic_axes for spec in tower.inputs}
    names = {"input_names": [s.name for s in tower.inputs], "output_names": [s.name for s in tower.outputs], "opset_version": opset}
    with quiet_exporter(debug) as log:
        try:
            if exporter == "torchscript":
                output_axes = {spec.name: spec.dynamic_axes for spec in tower.outputs}
                torch.onnx.export(
                    module, args, str(path), dynamo=False, dynamic_axes={**axes, **output_axes} if dynamic else None, do_constant_folding=True, **names
                )
            else:
                program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=axes if dynamic else None, optimize=True, **names)
                program.save(str(path))
                del program
        except Exception as exc:
            tail = "\n".join(log.getvalue().strip().splitlines()[-5:])
            raise VlmoptError(
                f"ONNX export of the {tower.name} tower failed: {str(exc).splitlines()[0][:300]}" + (f"\n{tail}" if debug and tail else "")
            ) from exc
    gc.collect()


def verify_tower(
    reference: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    candidate: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    tower: Tower,
    shapes: list[dict[str, int]],
    atol: float,
) -> dict[str, Any]:
    """Run both on the same inputs at every shape; per output the largest max-abs-diff (and the shape
    where it occurred), the smallest cosine and the mean cosine over all shapes."""
    worst = compare_feeds(reference, candidate, [make_inputs(tower, sizes, seed=seed) for seed, sizes in enumerate(shapes)])
    axes = [{k: v for k, v in s.items() if k in tower.axes} for s in shapes]
    for seen in worst.values():
        seen["shape"] = axes[seen.pop("feed")]
    passed = all(r["max_abs_diff"] <= atol for r in worst.values())
    return {"atol": atol, "shapes": axes, "outputs": worst, "passed": passed}


def run(model_dir: ModelDir, options: ConvertOptions, force: bool = False, debug: bool = False, progress: Callable[[str], None] | None = None) -> StageResult:
    """Export every tower of the source artifact's family to ONNX and verify each against PyTorch.

    Raises `CheckFailed` (nothing committed) when an output differs by more than the tolerance.
    """
    options.validate()
    parent = model_dir.artifact(options.source)
    if parent.kind != "hf":
        raise VlmoptError(f"convert reads a Hugging Face artifact; '{options.source}' is of kind '{parent.kind}'")
    hf_dir = model_dir.artifact_path(parent.name)
    config = load_config(hf_dir)
    family = family_for(config)
    if options.monolith and not family.supports_monolith:
        raise VlmoptError(f"--monolith needs a model with both towers; {family.name} has one")
    towers = family.towers(config, hf_dir, monolith=options.monolith)
    if options.static:
        towers = [t.with_static_axes(_static_sizes(t, options)) for t in towers]
    atol = options.atol if options.atol is not None else family.atol
    say = progress or (lambda message: None)

    def build(tmp: Path) -> StageOutput:
        import torch

        say("loading the PyTorch model (eager attention)")
        model = load_model(hf_dir, config=config, family=family, attn_implementation="eager")
        recorded: dict[str, dict[str, Any]] = {}
        verification: dict[str, Any] = {}
        for tower in towers:
            module = tower.wrap(model).eval()
            path = tmp / f"{tower.name}.onnx"
            exporter = choose_exporter(options.exporter, module)
            say(f"exporting the {tower.name} tower ({exporter} exporter)")
            started = time.perf_counter()
            export_tower(module, tower, path, options.opset, dynamic=not options.static, exporter=exporter, debug=debug)
            seconds = time.perf_counter() - started
            say(f"verifying the {tower.name} tower against PyTorch")
            reference = TorchRunner(module, [s.name for s in tower.inputs], [s.name for s in tower.outputs])
            candidate = OrtRunner(path, threads=torch.get_num_threads())
            shapes = _shapes(tower, options)
            result = verify_tower(reference.run, candidate.run, tower, shapes, atol)
            candidate.close()
            verification[tower.name] = result
            if not result["passed"]:
                worst = max(result["outputs"].values(), key=lambda r: r["max_abs_diff"])
                raise CheckFailed(
                    f"{tower.name} tower: output '{worst['output']}' differs from PyTorch by {worst['max_abs_diff']:.3g} "
                    f"(> --atol {atol:g}) at {worst['shape']}; nothing was written",
                    details={"verification": verification},
                )
            recorded[tower.name] = {
                "file": path.name,
                "exporter": exporter,
                "export_seconds": round(seconds, 2),
                "dynamic": not options.static,
                **tower.to_json(),
            }
        return StageOutput(
            towers=recorded,
            meta={
                "family": family.name,
                "model_type": config.model_type,
                "opset": options.opset,
                "attn_implementation": "eager",
                "precision": "fp32",
                # a pruned checkpoint's sparsity travels with its exports (TensorRT can ask for sparse kernels)
                **{key: parent.meta[key] for key in ("sparsity", "two_four_sparse") if key in parent.meta},
            },
            verification={"reference": "pytorch", "passed": True, "towers": verification},
        )

    return model_dir.produce(options.output, kind="onnx", stage="convert", options=asdict(options), parent=parent, build=build, force=force)


def _shapes(tower: Tower, options: ConvertOptions) -> list[dict[str, int]]:
    if options.static:
        fixed = _static_sizes(tower, options)
        return [fixed, fixed]
    return verification_sizes(tower)
