"""`vlmopt convert`: Hugging Face → ONNX, one graph per tower, verified against PyTorch before it is kept."""

from __future__ import annotations

import contextlib
import gc
import inspect
import io
import logging
import resource
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmopt import graph
from vlmopt.errors import VlmoptError
from vlmopt.families import Tower
from vlmopt.inputs import export_sizes, make_inputs, resolve_sizes, verification_sizes
from vlmopt.options import StageOptions, eval_images_option, eval_text_option, name_option, option, source_option
from vlmopt.records import TowerRecord
from vlmopt.stage import Accepts, Job, Stage, provisional
from vlmopt.workspace import StageOutput

MIN_OPSET, MAX_OPSET = 17, 23
EXPORTERS = ("auto", "dynamo", "torchscript")
DECODER_MAKERS = ("auto", "builder", "torch")
#: protobuf's limit: a larger graph must keep its weights as external data, which only the dynamo path writes
_SINGLE_FILE_LIMIT = 2**31 - 2**26


@dataclass
class ConvertOptions(StageOptions):
    source: str = source_option("hf", "the Hugging Face artifact to convert")
    name: str = name_option("onnx", "onnx")
    monolith: bool = option(False, "One graph with both towers and the zero-shot logits.")
    static: bool = option(False, "Fixed shapes instead of dynamic batch/sequence axes.")
    batch_size: int = option(1, "Batch size of a --static export.", minimum=1)
    seq_len: int | None = option(None, "Sequence length of a --static export (default: the model's maximum).", minimum=1)
    opset: int = option(18, f"ONNX opset ({MIN_OPSET}..{MAX_OPSET}).", minimum=MIN_OPSET, maximum=MAX_OPSET)
    atol: float | None = option(
        None, "Fail (exit 1, nothing written) when an output differs from PyTorch by more than this (default: the family's).", minimum=0.0, exclusive=("min",)
    )
    exporter: str = option(
        "auto", "auto (TorchScript below 2 GB of weights, dynamo above; dynamo for decoders with a KV cache), dynamo or torchscript.", choices=EXPORTERS
    )
    decoder: str = option(
        "auto",
        "Who makes a generative model's decoder part: builder (onnxruntime-genai's model builder: GroupQueryAttention, "
        "KV cache updated in place), torch (exported from PyTorch) or auto (builder where it builds the language model, else torch).",
        choices=DECODER_MAKERS,
    )
    eval_images: str | None = eval_images_option()
    eval_text: str | None = eval_text_option()

    def check(self) -> None:
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


def choose_exporter(requested: str, module: Any, exporters: tuple[str, ...] = EXPORTERS[1:]) -> str:
    """`auto` takes the TorchScript exporter (3x faster here, same verified numbers) while the
    tower's weights fit one protobuf file, and the dynamo exporter, which writes external data, beyond;
    a family whose towers only one exporter can take (a KV-cache decoder: dynamo) gets that one."""
    if requested != "auto":
        return requested
    if len(exporters) == 1:
        return exporters[0]
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    return "torchscript" if weight_bytes < _SINGLE_FILE_LIMIT else "dynamo"


def _dynamic_shapes(module: Any, tower: Tower) -> Any:
    """Every dynamic input axis free (`Dim.DYNAMIC`): the exporter then derives what depends on what
    (total_sequence = past_sequence + sequence) instead of refusing named axes it finds related. Trailing
    inputs that a `*args` parameter takes are one nested tuple, as torch.export wants them."""
    import torch

    shapes = [{axis: torch.export.Dim.DYNAMIC for axis in spec.dynamic_axes} or None for spec in tower.inputs]
    parameters = list(inspect.signature(module.forward).parameters.values())
    varargs = next((i for i, p in enumerate(parameters) if p.kind is inspect.Parameter.VAR_POSITIONAL), None)
    if varargs is not None:
        return (*shapes[:varargs], tuple(shapes[varargs:]))
    return tuple(shapes)


def name_axes(path: Path, tower: Tower) -> None:
    """Write `tower`'s axis names into the graph's inputs and outputs (the exporter's own are 's0', 's1 + s2');
    recorded shapes of intermediate values go, as ONNX Runtime's quantizers trip over them (DESIGN.md)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    specs = {spec.name: spec for spec in (*tower.inputs, *tower.outputs)}
    for value in (*model.graph.input, *model.graph.output):
        spec = specs.get(value.name)
        if spec is None:
            continue
        for axis, name in spec.dynamic_axes.items():
            dim = value.type.tensor_type.shape.dim[axis]
            dim.Clear()
            dim.dim_param = name
    del model.graph.value_info[:]
    onnx.save(model, str(path))  # external weights stay where they are (not loaded, so not rewritten)


def _release_matched_graphs() -> None:
    """Drop the graph onnxscript's rewrite rules keep after optimizing: each rule is a module-level object whose
    pattern matcher holds the last graph it matched (`SimplePatternMatcher._graph`, `_match`; onnxscript 0.7), and
    that graph holds the exported program's weights, the module's own tensors. Without this the towers exported
    last stay in memory after the model is gone (model a: 1471 MB resident after the model was freed, of 1879)."""
    try:
        from onnxscript.rewriter._matcher import SimplePatternMatcher
    except ImportError:  # another onnxscript layout: nothing known to release
        return
    for found in gc.get_objects():
        if isinstance(found, SimplePatternMatcher):
            for attribute in ("_graph", "_match", "_current_node", "_tracer"):
                if attribute in vars(found):
                    setattr(found, attribute, None)


def export_tower(module: Any, tower: Tower, path: Path, opset: int, dynamic: bool, exporter: str = "dynamo", debug: bool = False) -> None:
    """Export one wrapped tower to `path`, naming every dynamic axis (`tower`'s string axes)."""
    import torch

    feed = make_inputs(tower, resolve_sizes(tower, export_sizes(tower)))
    args = tuple(torch.from_numpy(feed[spec.name]) for spec in tower.inputs)
    axes = {spec.name: spec.dynamic_axes for spec in tower.inputs}
    derived = bool(tower.derived_axes)
    names = {"input_names": [s.name for s in tower.inputs], "output_names": [s.name for s in tower.outputs], "opset_version": opset}
    with quiet_exporter(debug) as log:
        try:
            if exporter == "torchscript":
                output_axes = {spec.name: spec.dynamic_axes for spec in tower.outputs}
                torch.onnx.export(
                    module, args, str(path), dynamo=False, dynamic_axes={**axes, **output_axes} if dynamic else None, do_constant_folding=True, **names
                )
            else:
                shapes = (_dynamic_shapes(module, tower) if derived else axes) if dynamic else None
                with torch.no_grad():
                    program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=shapes, optimize=True, **names)
                # weights beside the graph (`<name>.onnx.data`), streamed from the exported program: saving one
                # protobuf copies every weight twice more in memory (SmolLM2's decoder: peak 2736 MB against
                # 1188 MB this way, for 850 MB of fp32 weights)
                program.save(str(path), external_data=True)
                del program
                _release_matched_graphs()
        except Exception as exc:
            tail = "\n".join(log.getvalue().strip().splitlines()[-5:])
            raise VlmoptError(
                f"ONNX export of the {tower.name} tower failed: {str(exc).splitlines()[0][:300]}" + (f"\n{tail}" if debug and tail else "")
            ) from exc
    gc.collect()
    if derived and dynamic:
        name_axes(path, tower)


class Convert(Stage):
    name = "convert"
    Options = ConvertOptions
    produces = "onnx"
    accepts = Accepts(kinds=("hf",), hint="convert a checkpoint such as 'hf' (made by `vlmopt export`)")
    tools = ("torch", "transformers", "onnx", "onnxscript", "onnxruntime")
    summary = "Export each tower to ONNX (dynamic batch/sequence axes) and verify it against PyTorch."
    details = "Fails with exit 1, writing nothing, when an output differs by more than --atol.\nExample: vlmopt convert build/clip"

    def prepare(self, job: Job) -> None:
        from vlmopt.families import family_for
        from vlmopt.hf import load_config

        options: ConvertOptions = job.options
        config = load_config(job.parent_dir)
        family = family_for(config)
        if options.monolith and not family.supports_monolith:
            raise VlmoptError(f"--monolith needs a model with both towers; {family.name} has one")
        if options.exporter != "auto" and options.exporter not in family.exporters:
            raise VlmoptError(f"{family.name} parts export only with the {' or '.join(family.exporters)} exporter; drop --exporter {options.exporter}")
        if options.static and family.generative:
            raise VlmoptError(f"{family.name} parts keep dynamic axes (the decoder's past grows every step); drop --static")
        decoder = choose_decoder(options.decoder, family, config)
        towers = family.towers(config, job.parent_dir, monolith=options.monolith, decoder=decoder)
        if options.static:
            towers = [t.with_static_axes(_static_sizes(t, options)) for t in towers]
        job.state.update(config=config, family=family, wrappable={t.name: t for t in towers}, decoder_maker=decoder)

    def describe(self, artifact: Any) -> list[Any]:
        return _describe_decoder(artifact)

    def verified_towers(self, job: Job) -> dict[str, Tower]:
        return job.state["wrappable"]

    def build(self, job: Job, tmp: Path) -> StageOutput:
        from vlmopt.hf import load_model
        from vlmopt.verification import Gates, verify_artifacts
        from vlmopt.verification.check import shape_sets

        options: ConvertOptions = job.options
        config, family, towers = job.state["config"], job.state["family"], job.state["wrappable"]
        job.say("loading the PyTorch model (eager attention)")
        model = load_model(job.parent_dir, config=config, family=family, attn_implementation="eager")
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        records: dict[str, TowerRecord] = {}
        work: dict[str, dict[str, Any]] = {}
        preprocessor = family.preprocessor(job.parent_dir) if family.generative else None
        children_mb = None
        for tower in towers.values():
            path = tmp / f"{tower.name}.onnx"
            if tower.meta.get("maker") == "builder":
                from vlmopt.genai_builder import build_decoder

                work[tower.name] = build_decoder(family, model, preprocessor.tokenizer, tower, path, job.say, job.context.debug)
                children_mb = work[tower.name]["builder_peak_rss_mb"]
                records[tower.name] = TowerRecord(_unwrapped(tower), path.name, graph.weight_bytes(tmp, path.name))
                continue
            module = tower.wrap(model).eval()
            exporter = choose_exporter(options.exporter, module, family.exporters)
            job.say(f"exporting the {tower.name} tower ({exporter} exporter)")
            started = time.perf_counter()
            export_tower(module, tower, path, options.opset, dynamic=not options.static, exporter=exporter, debug=job.context.debug)
            work[tower.name] = {"exporter": exporter, "export_seconds": round(time.perf_counter() - started, 2), "dynamic": not options.static}
            records[tower.name] = TowerRecord(_unwrapped(tower), path.name, graph.weight_bytes(tmp, path.name))
        module = None
        decoder_part = family.contract.decoder.name if family.generative else None
        if decoder_part in records:
            # a prefill asks for its last position's logits only (`logits_to_keep`, as transformers' generate does)
            work[decoder_part]["logits_to_keep"] = graph.add_logits_to_keep(tmp / records[decoder_part].file)
        record: dict[str, Any] = {"opset": options.opset, "towers": work, "export_memory": export_memory(weights, children_mb)}
        if decoder_part is not None and family.decoder_makers:
            record[decoder_part] = job.state["decoder_maker"]
        job.say("verifying every tower against PyTorch")
        atol = options.atol if options.atol is not None else family.atol
        threads = job.context.thread_count
        extra = None
        if family.generative:
            from vlmopt.runners.genai import write_runtime_files
            from vlmopt.verification.generation import conversion_checks

            record["runtime"] = write_runtime_files(preprocessor, tmp, records)
            extra = lambda: conversion_checks(holder, preprocessor, tmp, records, threads, job.say)  # noqa: E731
        # the only reference left here: the family's checks take the model out once their references are computed
        holder = {"model": model}
        del model
        verification = verify_artifacts(
            job.parent_dir,
            job.parent,
            tmp,
            provisional(self, job, tmp, records),
            Gates(atol=atol),
            threads=threads,
            sets=lambda tower: shape_sets(tower, _shapes(tower, options), job.state.get("data")),
            data=job.state.get("data"),
            reference_model=holder["model"],
            extra=extra,
        )
        traits = job.parent.traits.derive(family=family.name, model_type=config.model_type, precision="fp32", attn_implementation="eager")
        return StageOutput(towers=records, traits=traits, record=record, verification=verification)


def _describe_decoder(artifact: Any) -> list[Any]:
    from vlmopt.families import family_named

    family = family_named(artifact.traits.family)
    if family is None or not family.generative:
        return []
    made = (artifact.record.get("towers") or {}).get(family.contract.decoder.name) or {}
    if "maker" not in made:
        return []
    fused = ", ".join(f"{op} x{n}" for op, n in made.get("fused_operators", {}).items())
    return [f"decoder made by {made['maker']} {made.get('version')} in {made.get('build_seconds')} s (peak {made.get('builder_peak_rss_mb')} MB): {fused}"]


def export_memory(weight_bytes: int, builder_mb: float | None = None) -> dict[str, Any]:
    """This process's peak resident memory so far (loading and exporting; a fresh `vlmopt convert` process
    has done nothing else) against the fp32 weights: the export's memory cost. With onnxruntime-genai's builder
    (its own process, `builder_mb` its peak) the ratio is the larger of the two processes'."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    figures = {"fp32_weights_mb": round(weight_bytes / 2**20, 1), "process_peak_rss_mb": round(peak / 2**20, 1)}
    if builder_mb is not None:
        figures["builder_peak_rss_mb"] = builder_mb
        peak = max(peak, builder_mb * 2**20)  # two processes, one after the other: the larger is the export's peak
    return {**figures, "ratio": round(peak / max(weight_bytes, 1), 2)}


def choose_decoder(requested: str, family: Any, config: Any) -> str:
    """Who makes the decoder part: `auto` takes the family's first maker that can build this checkpoint
    (onnxruntime-genai's builder where it is installed and builds the language model), `torch` otherwise."""
    from vlmopt.families import generative_families

    if not family.decoder_makers:
        if requested != "auto":
            raise VlmoptError(f"--decoder {requested} applies to generative models ({', '.join(generative_families())}); {family.name} has no decoder part")
        return "torch"
    if requested == "torch":
        return "torch"
    from vlmopt.genai_builder import unsupported

    reason = unsupported(family.text_config(config))
    if reason is None:
        return "builder"
    if requested == "builder":
        raise VlmoptError(f"--decoder builder: {reason}; --decoder torch exports it from PyTorch")
    return "torch"


def _unwrapped(tower: Tower) -> Tower:
    """The tower as the manifest keeps it: its interface, without the PyTorch wrapper."""
    return Tower.from_json(tower.name, tower.to_json())


def _shapes(tower: Tower, options: ConvertOptions) -> list[dict[str, int]]:
    if options.static:
        fixed = _static_sizes(tower, options)
        return [fixed, fixed]
    return verification_sizes(tower)


STAGE = Convert()
