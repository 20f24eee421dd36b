"""`vlmopt prune`: structured pruning that physically shrinks the Linears, plus magnitude and 2:4 sparsity.

Structured pruning removes MLP hidden neurons (up-projection rows and down-projection columns) and
attention heads (q/k/v rows and output columns, head by head), the same number in every block of a
tower, because a Hugging Face config holds one `intermediate_size` and one head count per tower. The
config is patched and the result saved with `save_pretrained`, so it reloads with plain
`from_pretrained`; the stage reloads it that way and checks it against the unpruned model.
Pruning without fine-tuning loses accuracy: the check reports it and gates only when asked.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlmopt.calibration import calibration_feeds, load_calibration, sample_count
from vlmopt.errors import VlmoptError
from vlmopt.families import Family, Tower
from vlmopt.families.base import PruneLayout
from vlmopt.options import StageOptions, eval_images_option, eval_text_option, min_agreement_option, min_cosine_option, name_option, option, source_option
from vlmopt.records import Sparsity
from vlmopt.runners import TorchRunner
from vlmopt.stage import Accepts, Job, Stage
from vlmopt.workspace import StageOutput

SCORES = ("l1", "l2", "activation")
SCOPES = ("layer", "global")
PATTERNS = ("unstructured", "2:4")
#: files save_pretrained writes itself; everything else of the parent (processors, pooling configs) is copied
_WEIGHT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "generation_config.json")


@dataclass
class PruneOptions(StageOptions):
    source: str = source_option("hf", "the Hugging Face artifact to prune")
    name: str = name_option("hf-pruned", "hf-pruned")
    mlp_ratio: float = option(0.0, "Fraction of MLP hidden neurons to remove in every block, in [0, 1).", minimum=0.0, maximum=1.0, exclusive=("max",))
    head_ratio: float = option(
        0.0, "Fraction of attention heads to remove in every block (models whose config carries head_dim: ViT).", minimum=0.0, maximum=1.0, exclusive=("max",)
    )
    score: str = option("l2", "Ranking: l1 or l2 weight magnitude, or activation (calibration data).", choices=SCORES)
    sparsity: float = option(0.0, "Then zero this fraction of the remaining weights (magnitude).", minimum=0.0, maximum=1.0, exclusive=("max",))
    pattern: str = option("unstructured", "unstructured, or 2:4 (2 of every 4 input weights kept; TensorRT sparse kernels).", choices=PATTERNS)
    scope: str = option("layer", "--sparsity per layer, or global (one threshold over all layers).", choices=SCOPES)
    tower: list[str] = option([], "Only these towers (repeatable).")
    calib_images: str | None = option(None, "--score activation: a folder of jpg/png images.", path=True, metavar="DIR")
    calib_text: str | None = option(None, "--score activation: a text file, one prompt a line.", path=True, metavar="FILE")
    calib_samples: int = option(32, "Most calibration samples per tower.", minimum=1)
    min_cosine: float | None = min_cosine_option(None)
    min_agreement: float | None = min_agreement_option(None)
    eval_images: str | None = eval_images_option()
    eval_text: str | None = eval_text_option()

    def check(self) -> None:
        if self.pattern == "2:4" and self.sparsity not in (0.0, 0.5):
            raise VlmoptError(f"--pattern 2:4 is 50% sparse by definition; drop --sparsity {self.sparsity}")
        if self.scope == "global" and (self.mlp_ratio or self.head_ratio):
            raise VlmoptError(
                "--scope global applies to --sparsity: a Hugging Face config holds one intermediate_size and one head count per tower, "
                "so structured pruning removes the same number from every block (--scope layer)"
            )
        if not (self.mlp_ratio or self.head_ratio or self.sparsity or self.pattern == "2:4"):
            raise VlmoptError("nothing to prune: give --mlp-ratio, --head-ratio, --sparsity or --pattern 2:4")
        if self.score != "activation" and (self.calib_images or self.calib_text):
            raise VlmoptError("--calib-images/--calib-text feed --score activation; add it or drop them")


# -- finding the prunable parts ---------------------------------------------------------------
def _resolve(module: Any, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


@dataclass
class Block:
    """One owner of prunable Linears: a transformer block (MLP and attention) or an MLP-only head."""

    module: Any
    mlp: tuple[Any, Any] | None
    attention: tuple[Any, Any, Any, Any] | None


def find_blocks(module: Any, layout: PruneLayout) -> list[Block]:
    """Every sub-module of a tower that owns the layout's MLP pair or attention projections."""
    from torch import nn

    blocks = []
    for sub in module.modules():
        mlp = tuple(_resolve(sub, p) for p in layout.mlp)
        attention = tuple(_resolve(sub, p) for p in layout.attention) if layout.attention else ()
        has_mlp = all(isinstance(m, nn.Linear) for m in mlp)
        has_attention = bool(attention) and all(isinstance(m, nn.Linear) for m in attention)
        if has_mlp or has_attention:
            blocks.append(Block(sub, mlp if has_mlp else None, attention if has_attention else None))  # type: ignore[arg-type]
    return blocks


def _replace(owner: Any, path: str, new: Any) -> None:
    parent_path, _, attribute = path.rpartition(".")
    setattr(_resolve(owner, parent_path) if parent_path else owner, attribute, new)


def _shrunk(linear: Any, rows: Any = None, columns: Any = None) -> Any:
    """A new Linear with only the given output rows and/or input columns."""
    from torch import nn

    weight = linear.weight.data
    if rows is not None:
        weight = weight[rows]
    if columns is not None:
        weight = weight[:, columns]
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, dtype=weight.dtype)
    new.weight.data.copy_(weight)
    if linear.bias is not None:
        new.bias.data.copy_(linear.bias.data[rows] if rows is not None else linear.bias.data)
    return new


# -- scores -------------------------------------------------------------------------------------
def _norm(weight: Any, dim: int, score: str) -> Any:
    return weight.abs().sum(dim=dim) if score == "l1" else weight.pow(2).sum(dim=dim).sqrt()


def mlp_scores(block: Block, score: str, activations: dict[int, Any]) -> Any:
    """Importance per hidden neuron: the magnitude of its path (up row x down column), or for
    `activation` its mean |input| to the down projection on calibration data times the down column's norm."""
    up, down = block.mlp  # type: ignore[misc]
    down_norm = _norm(down.weight.data, 0, "l2" if score == "activation" else score)
    if score == "activation":
        return activations[id(down)] * down_norm
    return _norm(up.weight.data, 1, score) * down_norm


def head_scores(block: Block, heads: int, score: str, activations: dict[int, Any]) -> Any:
    q, k, v, o = block.attention  # type: ignore[misc]
    head_dim = q.weight.shape[0] // heads
    out_norm = _norm(o.weight.data, 0, "l2" if score == "activation" else score).reshape(heads, head_dim).sum(1)
    if score == "activation":
        return activations[id(o)].reshape(heads, head_dim).sum(1) * out_norm
    rows = sum(_norm(m.weight.data, 1, score).reshape(heads, head_dim).sum(1) for m in (q, k, v))
    return rows * out_norm


def collect_activations(wrapper: Any, blocks: list[Block], feeds: list[dict[str, np.ndarray]], input_names: list[str]) -> dict[int, Any]:
    """Mean |input| per input feature of every down/out projection, over all calibration tokens."""
    import torch

    targets = [b.mlp[1] for b in blocks if b.mlp] + [b.attention[3] for b in blocks if b.attention]
    sums: dict[int, Any] = {}
    counts: dict[int, int] = {}

    def hook(module: Any, args: tuple[Any, ...]) -> None:
        x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).double()
        sums[id(module)] = sums.get(id(module), 0) + x.sum(0)
        counts[id(module)] = counts.get(id(module), 0) + x.shape[0]

    handles = [t.register_forward_pre_hook(hook) for t in targets]
    try:
        with torch.inference_mode():
            for feed in feeds:
                wrapper(*[torch.from_numpy(np.ascontiguousarray(feed[n])) for n in input_names])
    finally:
        for handle in handles:
            handle.remove()
    return {key: (sums[key] / counts[key]).float() for key in sums}


# -- structured pruning -----------------------------------------------------------------------
def _kept(count: int, ratio: float) -> int:
    return count - int(round(count * ratio))


def prune_mlps(blocks: list[Block], layout: PruneLayout, ratio: float, score: str, activations: dict[int, Any]) -> tuple[int, int]:
    """Keep the top neurons of every MLP (the same number in each); returns (before, after)."""
    import torch

    mlp_blocks = [b for b in blocks if b.mlp]
    before = mlp_blocks[0].mlp[0].out_features  # type: ignore[index]
    keep = _kept(before, ratio)
    for block in mlp_blocks:
        kept = torch.sort(torch.topk(mlp_scores(block, score, activations), keep).indices).values
        up, down = block.mlp  # type: ignore[misc]
        _replace(block.module, layout.mlp[0], _shrunk(up, rows=kept))
        _replace(block.module, layout.mlp[1], _shrunk(down, columns=kept))
    return before, keep


def prune_heads(blocks: list[Block], layout: PruneLayout, heads: int, ratio: float, score: str, activations: dict[int, Any]) -> tuple[int, int, int]:
    """Keep the top heads of every attention (the same number in each); returns (before, after, head_dim)."""
    import torch

    attention_blocks = [b for b in blocks if b.attention]
    keep = _kept(heads, ratio)
    head_dim = attention_blocks[0].attention[0].out_features // heads  # type: ignore[index]
    for block in attention_blocks:
        kept_heads = torch.sort(torch.topk(head_scores(block, heads, score, activations), keep).indices).values
        features = (kept_heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)
        q, k, v, o = block.attention  # type: ignore[misc]
        for path, linear in zip(layout.attention[:3], (q, k, v), strict=True):  # type: ignore[index]
            _replace(block.module, path, _shrunk(linear, rows=features))
        _replace(block.module, layout.attention[3], _shrunk(o, columns=features))  # type: ignore[index]
    return heads, keep, head_dim


# -- sparsity ---------------------------------------------------------------------------------
def sparsify(linears: list[Any], sparsity: float, pattern: str, scope: str) -> dict[str, Any]:
    """Zero weights for good (no masks): the smallest |w| per layer or globally, or 2 of every 4 along the input."""
    import torch

    with torch.no_grad():
        if pattern == "2:4":
            for linear in linears:
                weight = linear.weight.data
                rows, columns = weight.shape
                groups = weight[:, : columns - columns % 4].reshape(rows, -1, 4)
                smallest = groups.abs().topk(2, dim=-1, largest=False).indices
                groups.scatter_(-1, smallest, 0.0)
                weight[:, : columns - columns % 4] = groups.reshape(rows, -1)
        elif scope == "global":
            magnitudes = torch.cat([linear.weight.data.abs().reshape(-1) for linear in linears])
            threshold = torch.kthvalue(magnitudes, max(1, int(sparsity * magnitudes.numel()))).values
            for linear in linears:
                linear.weight.data[linear.weight.data.abs() <= threshold] = 0.0
        else:
            for linear in linears:
                weight = linear.weight.data
                count = int(sparsity * weight.numel())
                if count:
                    threshold = torch.kthvalue(weight.abs().reshape(-1), count).values
                    weight[weight.abs() <= threshold] = 0.0
    zeros = sum(int((linear.weight.data == 0).sum()) for linear in linears)
    total = sum(linear.weight.numel() for linear in linears)
    return {
        "pattern": pattern,
        "scope": scope if pattern == "unstructured" else "layer",
        "target": 0.5 if pattern == "2:4" else sparsity,
        "achieved": zeros / total,
        "layers": len(linears),
    }


def is_two_four(weight: np.ndarray) -> bool:
    """Whether every group of 4 consecutive input weights holds at most 2 non-zeros."""
    columns = weight.shape[1] - weight.shape[1] % 4
    return bool(((weight[:, :columns].reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


# -- report helpers ---------------------------------------------------------------------------
def tower_cost(wrapper: Any, tower: Tower) -> tuple[int, int]:
    """(parameters, FLOPs of one item at the tower's usual size), FLOPs counted by torch's FlopCounterMode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vlmopt.inputs import make_inputs

    max_seq = tower.vocab.max_length if tower.vocab else 1
    feed = make_inputs(tower, {"batch": 1, "sequence": tower.bench_sizes.get("sequence", max_seq)}, seed=0)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        wrapper(*[torch.from_numpy(feed[s.name]) for s in tower.inputs])
    return sum(p.numel() for p in wrapper.parameters()), int(counter.get_total_flops())


# -- the stage --------------------------------------------------------------------------------
def _layout(family: Family, config: Any) -> PruneLayout:
    layout = family.pruning(config)
    if layout is None:
        raise VlmoptError(
            f"structured pruning does not know the blocks of '{config.model_type}' checkpoints; it supports clip, siglip, vit, bert, roberta, xlm-roberta and electra"
        )
    return layout


class Prune(Stage):
    name = "prune"
    Options = PruneOptions
    produces = "hf"
    accepts = Accepts(kinds=("hf",), hint="prune a checkpoint such as 'hf' (made by `vlmopt export`)")
    tools = ("torch", "transformers")
    summary = (
        "Shrink the model: remove MLP neurons and attention heads (a smaller checkpoint that reloads with from_pretrained), "
        "and/or zero weights by magnitude or in a 2:4 pattern. Without fine-tuning, pruning loses accuracy: the report says how much."
    )
    details = "Example: vlmopt prune build/clip --mlp-ratio 0.3"

    def prepare(self, job: Job) -> None:
        """Bad settings are refused before any work: a tower with no MLPs, a ratio that empties a layer. The unpruned
        model loaded for that (its own config object: the pruned model's gets patched) is the reference."""
        from vlmopt.families import family_for
        from vlmopt.hf import load_config, load_model

        options: PruneOptions = job.options
        hf_dir = job.parent_dir
        config = load_config(hf_dir)
        family = family_for(config)
        layout = _layout(family, config)
        towers = {t.name: t for t in family.towers(config, hf_dir)}
        chosen = list(dict.fromkeys(options.tower or towers))
        unknown = [t for t in chosen if t not in towers]
        if unknown:
            raise VlmoptError(f"no tower named {', '.join(unknown)} in this {family.name} model (towers: {', '.join(towers)})")
        if options.head_ratio and not layout.head_dim_in_config:
            raise VlmoptError(
                f"--head-ratio cannot be applied to {family.name}: transformers computes its head size as hidden_size / num_attention_heads, "
                "so a checkpoint with fewer heads would not reload with from_pretrained (ViT reads head_dim from its config); use --mlp-ratio"
            )
        import torch

        torch.set_num_threads(job.context.thread_count)
        reference = load_model(hf_dir, config=load_config(hf_dir), family=family, attn_implementation="eager")
        for name in chosen:
            _check_tower(name, find_blocks(towers[name].wrap(reference), layout), family.tower_config(config, name), options)
        data = load_calibration(job.model_dir, {n: towers[n] for n in chosen}, options.calib_images, options.calib_text, options.calib_samples)
        job.state.update(config=config, family=family, layout=layout, towers=towers, chosen=chosen, reference=reference, calibration_data=data)
        job.recorded["tower"] = chosen

    def verified_towers(self, job: Job) -> dict[str, Tower]:
        return {n: job.state["towers"][n] for n in job.state["chosen"]}

    def build(self, job: Job, tmp: Path) -> StageOutput:
        from vlmopt.hf import load_config, load_model
        from vlmopt.verification import Gates, verify_runners

        options: PruneOptions = job.options
        hf_dir, family, layout, towers, chosen = job.parent_dir, job.state["family"], job.state["layout"], job.state["towers"], job.state["chosen"]
        job.say("loading the model")
        model = load_model(hf_dir, config=load_config(hf_dir), family=family, attn_implementation="eager")
        work: dict[str, dict[str, Any]] = {}
        calibration: dict[str, dict[str, Any]] = {}
        for name in chosen:
            work[name] = self._prune_tower(job, model, towers[name], layout, calibration)

        job.say("saving and reloading with from_pretrained")
        model.save_pretrained(tmp)
        for item in hf_dir.iterdir():
            if item.name in _WEIGHT_FILES or (tmp / item.name).exists():
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
            else:
                shutil.copy2(item, tmp / item.name)
        del model
        reloaded = load_model(tmp, config=load_config(tmp), family=family, attn_implementation="eager")

        job.say("checking the pruned model against the original")
        checked = {n: towers[n] for n in chosen}
        reference = job.state["reference"]

        def runner(model: Any) -> Any:
            return lambda tower: TorchRunner(checked[tower.name].wrap(model), [s.name for s in tower.inputs], [s.name for s in tower.outputs])

        verification = verify_runners(checked, runner(reference), runner(reloaded), Gates.of(options), job.parent.name, data=job.state.get("data"))
        sparsity = {n: Sparsity(**w["sparsity"]) for n, w in work.items() if "sparsity" in w}
        traits = job.parent.traits.derive(sparsity=sparsity, two_four_sparse=bool(sparsity) and all(s.pattern == "2:4" for s in sparsity.values()))
        record: dict[str, Any] = {"towers": work, "pruned_towers": chosen, "fine_tuned": False}
        if calibration:
            record["calibration"] = calibration
        return StageOutput(traits=traits, record=record, verification=verification)

    def describe(self, artifact: Any) -> list[Any]:
        from rich.table import Table

        table = Table(title="pruning (no fine-tuning: expect accuracy loss; fine-tune before deploying)", title_justify="left")
        for column in ("tower", "MLP neurons", "heads", "parameters", "FLOPs / item", "sparsity"):
            table.add_column(column, justify="left" if column == "tower" else "right")
        for tower, r in artifact.record.get("towers", {}).items():
            mlp = f"{r['mlp']['before']} -> {r['mlp']['after']}" if "mlp" in r else ""
            heads = f"{r['heads']['before']} -> {r['heads']['after']}" if "heads" in r else ""
            params = f"{r['parameters_before']:,} -> {r['parameters_after']:,}"
            flops = f"{_si(r['flops_before'])} -> {_si(r['flops_after'])} ({r['flops_after'] / r['flops_before']:.0%})"
            sparse = r.get("sparsity")
            table.add_row(tower, mlp, heads, params, flops, f"{sparse['pattern']} {sparse['achieved']:.1%}" if sparse else "")
        return [table]

    def _prune_tower(self, job: Job, model: Any, tower: Tower, layout: PruneLayout, calibration: dict[str, Any]) -> dict[str, Any]:
        options: PruneOptions = job.options
        name = tower.name
        wrapper = tower.wrap(model).eval()
        params_before, flops_before = tower_cost(wrapper, tower)
        blocks = find_blocks(wrapper, layout)
        tower_config = job.state["family"].tower_config(model.config, name)
        entry: dict[str, Any] = {"parameters_before": params_before, "flops_before": flops_before}
        activations: dict[int, Any] = {}
        if options.score == "activation" and (options.mlp_ratio or options.head_ratio):
            feeds, origin = calibration_feeds(tower, job.state["calibration_data"], options.calib_samples)
            count = sample_count(feeds)
            calibration[name] = {"data": origin, "samples": count, "method": "activation"}
            if origin == "synthetic":
                job.warn(f"the {name} tower's activation scores come from SYNTHETIC random inputs: a fallback; pass real data with --calib-images/--calib-text")
            job.say(f"scoring the {name} tower on {count} samples")
            activations = collect_activations(wrapper, blocks, feeds, [s.name for s in tower.inputs])
        if options.mlp_ratio:
            job.say(f"removing {options.mlp_ratio:.0%} of the {name} tower's MLP neurons")
            before, after = prune_mlps(blocks, layout, options.mlp_ratio, options.score, activations)
            tower_config.intermediate_size = after
            entry["mlp"] = {"before": before, "after": after}
        if options.head_ratio:
            job.say(f"removing {options.head_ratio:.0%} of the {name} tower's heads")
            before, after, head_dim = prune_heads(blocks, layout, tower_config.num_attention_heads, options.head_ratio, options.score, activations)
            tower_config.num_attention_heads = after
            tower_config.head_dim = head_dim
            entry["heads"] = {"before": before, "after": after, "head_dim": head_dim}
        if options.sparsity or options.pattern == "2:4":
            blocks = find_blocks(wrapper, layout)
            linears = [m for b in blocks for m in (*(b.mlp or ()), *(b.attention or ()))]
            entry["sparsity"] = sparsify(linears, options.sparsity, options.pattern, options.scope)
        entry["parameters_after"], entry["flops_after"] = tower_cost(wrapper, tower)
        return entry


def _si(value: float) -> str:
    for factor, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= factor:
            return f"{value / factor:.2f} {unit}"
    return f"{value:.0f}"


def _check_tower(name: str, blocks: list[Block], tower_config: Any, options: PruneOptions) -> None:
    if options.mlp_ratio and not any(b.mlp for b in blocks):
        raise VlmoptError(f"--mlp-ratio: the {name} tower has no MLP blocks to prune")
    if options.mlp_ratio and _kept(tower_config.intermediate_size, options.mlp_ratio) < 1:
        raise VlmoptError(
            f"--mlp-ratio {options.mlp_ratio:g} would remove every MLP neuron of the {name} tower's layers ({tower_config.intermediate_size} each)"
        )
    if options.head_ratio and not any(b.attention for b in blocks):
        raise VlmoptError(f"--head-ratio: the {name} tower has no attention blocks to prune")
    if (options.sparsity or options.pattern == "2:4") and not blocks:
        raise VlmoptError(f"--sparsity/--pattern: the {name} tower has no blocks with prunable Linears")
    if options.head_ratio and _kept(tower_config.num_attention_heads, options.head_ratio) < 1:
        raise VlmoptError(
            f"--head-ratio {options.head_ratio:g} would remove every head of the {name} tower's layers ({tower_config.num_attention_heads} heads each)"
        )


STAGE = Prune()
