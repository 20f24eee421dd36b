"""`vlmopt optimize`: ONNX Runtime's transformer optimizer (Attention, SkipLayerNormalization, Gelu fusions), verified.

The family declares each tower's optimizer model type, heads and hidden size; this stage runs
`onnxruntime.transformers.optimizer.optimize_model` with them, counts what fused, and checks the
result against the fp32 graph it came from on the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmopt import graph
from vlmopt.errors import VlmoptError
from vlmopt.families import Tower
from vlmopt.options import StageOptions, atol_option, eval_images_option, eval_text_option, min_cosine_option, name_option, option, source_option
from vlmopt.quiet import quiet_onnxruntime_tools
from vlmopt.records import TowerRecord, Traits
from vlmopt.stage import Accepts, Job, Made, Stage

#: fused operators worth reporting (ONNX Runtime's names)
FUSED_OPS = (
    "Attention",
    "MultiHeadAttention",
    "SkipLayerNormalization",
    "LayerNormalization",
    "EmbedLayerNormalization",
    "BiasGelu",
    "FastGelu",
    "Gelu",
    "QuickGelu",
    "SkipSimplifiedLayerNormalization",
)
#: optimizer model types whose attention fusion takes an additive mask only from a tensor named `attention_mask`
_ADDITIVE_MASK_BY_NAME = ("clip",)
_MASK_ALIAS = "attention_mask"
_INPUT_ALIAS = "attention_mask__vlmopt_input"


@dataclass
class OptimizeOptions(StageOptions):
    source: str = source_option("onnx", "the fp32 ONNX artifact to optimize")
    name: str = name_option("onnx-opt", "onnx-opt")
    attention: bool = option(True, "Fuse attention blocks into ONNX Runtime's Attention op.", flag="--attention/--no-attention")
    model_type: str | None = option(None, "ONNX Runtime optimizer model type (default: the family's per tower).")
    atol: float | None = atol_option(1e-3)
    min_cosine: float | None = min_cosine_option(0.9999)
    eval_images: str | None = eval_images_option()
    eval_text: str | None = eval_text_option()

    def check(self) -> None:
        from onnxruntime.transformers.optimizer import MODEL_TYPES

        if self.model_type is not None and self.model_type not in MODEL_TYPES:
            raise VlmoptError(f"--model-type must be one of ONNX Runtime's optimizer types ({', '.join(sorted(MODEL_TYPES))}), got '{self.model_type}'")


def attention_layers(model: Any) -> int:
    """Attention blocks in an unfused export: one Softmax each."""
    return sum(1 for node in model.graph.node if node.op_type == "Softmax")


def _shared_additive_mask(model: Any) -> str | None:
    """The one tensor added to the scores before every Softmax (CLIP text's causal + padding mask), if there is one."""
    producers = {out: node for node in model.graph.node for out in node.output}
    masks = set()
    for node in model.graph.node:
        if node.op_type == "Softmax":
            add = producers.get(node.input[0])
            if add is None or add.op_type != "Add":
                return None
            masks.add(add.input[1])
    return masks.pop() if len(masks) == 1 else None


def _attention_branch_second(model: Any) -> int:
    """Put the attention branch second in each residual Add (`residual + attention(x)`, CLIP's order).

    ONNX Runtime's CLIP attention fusion finds the block from the SkipLayerNormalization's input 1;
    ViT writes `attention(x) + residual`, so its blocks go unfused. Add is commutative: swapping its
    operands changes no result. Returns how many were swapped."""
    producers = {out: node for node in model.graph.node for out in node.output}

    def attention_output(name: str) -> bool:
        # out_proj bias Add <- out_proj MatMul <- Reshape <- Transpose <- MatMul(probs, V)
        add = producers.get(name)
        if add is None or add.op_type != "Add":
            return False
        for operand in add.input:
            path, node = [], producers.get(operand)
            for op in ("MatMul", "Reshape", "Transpose", "MatMul"):
                if node is None or node.op_type != op:
                    break
                path.append(node)
                node = producers.get(node.input[0])
            if len(path) == 4:
                return True
        return False

    swapped = 0
    for node in model.graph.node:
        if node.op_type == "Add" and len(node.input) == 2 and attention_output(node.input[0]) and not attention_output(node.input[1]):
            node.input[0], node.input[1] = node.input[1], node.input[0]
            swapped += 1
    return swapped


def _fold_layer_scale(model: Any) -> int:
    """Fold a constant per-channel scale that follows a Linear into the Linear: `(x W + b) * g = x (W g) + b g`.

    DINOv2's layer scale sits between the attention output projection and the residual Add, where ONNX Runtime's
    attention fusion expects the Add; folded, its blocks fuse like ViT's. The scaled weight and bias are new
    initializers (the exporter shares equal tensors between layers through Identity nodes), and only a Linear whose
    output feeds the Mul alone is folded. Returns how many were folded."""
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    graph_outputs = {value.name for value in model.graph.output}

    def constant(name: str) -> Any:
        while name not in initializers:
            node = producers.get(name)
            if node is None or node.op_type != "Identity":
                return None
            name = node.input[0]
        return numpy_helper.to_array(initializers[name])

    folded = []
    for mul in model.graph.node:
        if mul.op_type != "Mul" or len(mul.input) != 2:
            continue
        scale_at = next((i for i, name in enumerate(mul.input) if constant(name) is not None), None)
        if scale_at is None:
            continue
        scale, linear_out = constant(mul.input[scale_at]), mul.input[1 - scale_at]
        add = producers.get(linear_out)
        if add is None or add.op_type != "Add" or uses.get(linear_out) != 1 or linear_out in graph_outputs:
            continue
        bias_at = next((i for i, name in enumerate(add.input) if constant(name) is not None), None)
        matmul = producers.get(add.input[1 - bias_at]) if bias_at is not None else None
        if matmul is None or matmul.op_type != "MatMul" or constant(matmul.input[1]) is None:
            continue
        bias, weight = constant(add.input[bias_at]), constant(matmul.input[1])
        if scale.ndim != 1 or bias.shape != scale.shape or weight.ndim != 2 or weight.shape[1] != scale.shape[0]:
            continue
        if uses.get(matmul.output[0]) != 1:
            continue
        for node, index, value in ((matmul, 1, weight * scale), (add, bias_at, bias * scale)):
            name = f"{mul.name or mul.output[0]}/folded_{'weight' if node is matmul else 'bias'}"
            model.graph.initializer.append(numpy_helper.from_array(value.astype(weight.dtype), name))
            node.input[index] = name
        add.output[0] = mul.output[0]
        folded.append(mul)
    for mul in folded:
        model.graph.node.remove(mul)
    return len(folded)


def _rename(model: Any, renames: dict[str, str]) -> None:
    for node in model.graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
        node.output[:] = [renames.get(name, name) for name in node.output]
    for value in model.graph.input:
        value.name = renames.get(value.name, value.name)


def optimize_graph(model: Any, tower: Tower, model_type: str, attention: bool, debug: bool = False) -> tuple[Any, dict[str, int]]:
    """Fuse `model` (an fp32 tower export) in place; returns it and the fused operator counts.

    ONNX Runtime's CLIP attention fusion accepts the text tower's precomputed mask only when the
    tensor is called `attention_mask` (the name of our graph input); it is renamed for the fusion and back.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    if model_type in _ADDITIVE_MASK_BY_NAME and attention:
        _fold_layer_scale(model)
        _attention_branch_second(model)
    mask = _shared_additive_mask(model) if model_type in _ADDITIVE_MASK_BY_NAME and attention else None
    if mask is not None:
        _rename(model, {_MASK_ALIAS: _INPUT_ALIAS, mask: _MASK_ALIAS})
    options = FusionOptions(model_type)
    options.enable_attention = attention
    with quiet_onnxruntime_tools(debug):
        optimized = optimize_model(
            model, model_type=model_type, num_heads=tower.num_heads or 0, hidden_size=tower.hidden_size or 0, optimization_options=options, opt_level=0
        )
    result = optimized.model
    _declare_domains(result)
    if mask is not None:
        _rename(result, {_MASK_ALIAS: mask, _INPUT_ALIAS: _MASK_ALIAS})
    counts = graph.op_counts(result)
    return result, {op: counts[op] for op in FUSED_OPS if counts.get(op)}


def _declare_domains(model: Any) -> None:
    """The optimizer adds com.microsoft operators without always importing their opset; checkers and quantizers need it."""
    from onnx import helper

    declared = {opset.domain for opset in model.opset_import}
    for domain in graph.custom_domains(model):
        if domain not in declared:
            model.opset_import.append(helper.make_opsetid(domain, 1))


class Optimize(Stage):
    name = "optimize"
    Options = OptimizeOptions
    produces = "onnx"
    accepts = Accepts(kinds=("onnx",), precisions=("fp32",), fused=False, hint="optimize reads an fp32 export such as 'onnx' (made by `vlmopt convert`)")
    tools = ("onnxruntime", "onnx")
    summary = "Fuse Attention, SkipLayerNormalization and Gelu with ONNX Runtime's transformer optimizer; verify against the unfused graph."
    details = "Example: vlmopt optimize build/clip"

    def make_tower(self, job: Job, tower: str, tmp: Path) -> Made:
        options: OptimizeOptions = job.options
        spec = job.towers[tower]
        model_type = options.model_type or spec.optimizer_model_type or "bert"
        job.say(f"fusing the {tower} tower ({model_type} optimizer)")
        file = job.parent.towers[tower].file
        source = graph.load(job.parent_file(tower))
        layers = attention_layers(source)
        optimized, fused = optimize_graph(source, spec, model_type, options.attention, job.context.debug)
        graph.save(optimized, tmp / file)
        work = {
            "optimizer_model_type": model_type,
            "fused": fused,
            "attention_layers": layers,
            "parent_size": graph.weight_bytes(job.parent_dir, file),
            "ort_only_ops": graph.custom_domains(optimized),
        }
        return Made(TowerRecord(spec, file, graph.weight_bytes(tmp, file)), work)

    def describe(self, artifact: Any) -> list[Any]:
        lines = []
        for tower, work in artifact.record.get("towers", {}).items():
            counts = work["fused"]
            attention = counts.get("Attention", 0) + counts.get("MultiHeadAttention", 0)
            lines.append(f"fused in {tower}: attention {attention}/{work['attention_layers']} layers; " + ", ".join(f"{op} {n}" for op, n in counts.items()))
        return lines

    def traits(self, job: Job, made: dict[str, Made]) -> Traits:
        return job.parent.traits.derive(fused=True, ort_only_ops=sorted({d for m in made.values() for d in m.work["ort_only_ops"]}))


STAGE = Optimize()
