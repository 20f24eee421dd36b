"""`vlmopt distill`: train a pruned student to match its unpruned teacher on the user's unlabeled data.

The student (`--from`, by default `hf-pruned`) and the teacher (`--teacher`, by default `hf`) are Hugging Face
artifacts of one family with the same towers and output sizes. Each tower that has training data (text towers
`--data-text`, image towers `--data-images`) is trained on the losses of `vlmopt.distillation` with PyTorch's
AdamW and transformers' cosine schedule with warm-up; the other towers stay as they are. A held-out part of the
user's data decides early stopping, and the best weights on it are the ones written. Checkpoints are written
under `DIR/checkpoints/NAME/` every `--checkpoint-every` steps: a kill or Ctrl-C keeps the last complete one,
and the same command run again goes on from it; they are removed once the artifact is committed.

Why not torchdistill: its yaml-configured training box owns the data loaders, epochs and checkpoints, where this
stage needs its own (a batch per (seed, step), atomic resumable checkpoints, a staged commit); the part of it that
fits, ForwardHookManager for intermediate outputs, is the dozen lines of `_Hidden` here.

The result is saved with `save_pretrained` (it reloads with `from_pretrained`, and every later stage takes it like
any `hf` artifact), reloaded, and verified against the teacher on the built-in real evaluation data, which training
never reads; the record holds the student's fidelity before and after.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlmopt import distillation as d
from vlmopt import options as opts
from vlmopt.calibration import check_fits, encode_text, process_images, saved_processors, text_padding
from vlmopt.errors import Interrupted, VlmoptError
from vlmopt.evaluation import TEXT_ROLES
from vlmopt.families import Tower
from vlmopt.options import StageOptions, eval_images_option, eval_text_option, min_agreement_option, min_cosine_option, name_option, option, source_option
from vlmopt.records import Verification
from vlmopt.runners import TorchRunner
from vlmopt.stage import Accepts, Job, RunContext, Stage, StageResult
from vlmopt.versions import tool_versions
from vlmopt.workspace import ModelDir, StageOutput

LOSSES = ("cosine", "mse")
HIDDEN_WEIGHTINGS = ("line", "token")
#: the folder of the model directory that holds training checkpoints (one sub-folder per artifact name)
CHECKPOINTS = "checkpoints"
#: most held-out samples per tower measured every --eval-every steps
MAX_HELD_OUT = 256
#: options that do not change what training does: a rerun that changes only these resumes the same run
_NOT_TRAINING = ("name", "minutes", "min_cosine", "min_agreement", "eval_images", "eval_text", "eval_images_digest", "eval_text_digest")
#: files save_pretrained writes itself; everything else of the student (processors, pooling configs) is copied
_WEIGHT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "generation_config.json")
_STAGES_OF_DERIVED = ("prune", "distill")


@dataclass
class DistillOptions(StageOptions):
    source: str = source_option("hf-pruned", "the student, a Hugging Face artifact (usually made by `vlmopt prune`)")
    teacher: str = option("hf", "The artifact the student learns to match: the original Hugging Face model it was pruned from.", metavar="ARTIFACT")
    name: str = name_option("hf-distilled", "hf-distilled")
    data_text: str | None = option(
        None, "Unlabeled training text for text towers: a UTF-8 file, one sentence a line (never the built-in evaluation data).", path=True, metavar="FILE"
    )
    data_images: str | None = option(None, "Unlabeled training images for image towers: a folder of jpg/png.", path=True, metavar="DIR")
    steps: int = option(300, "Optimizer steps at most (the length of the learning-rate schedule).", minimum=1)
    minutes: float | None = option(
        None, "Also stop after this many minutes of training, the runs of a resumed training together.", minimum=0.0, exclusive=("min",), metavar="M"
    )
    batch_size: int = option(32, "Samples per step and tower.", minimum=1)
    lr: float = option(1e-4, "Peak learning rate of AdamW (linear warm-up, then cosine decay over --steps).", minimum=0.0, exclusive=("min",))
    warmup: float = option(0.06, "Fraction of --steps spent warming the learning rate up.", minimum=0.0, maximum=0.5)
    loss: str = option("cosine", "Loss on the output embedding: cosine (1 - cosine) or mse (relative to the teacher's mean square).", choices=LOSSES)
    hidden_weight: float = option(
        1.0, "Weight of the loss on every block's hidden states (where the student keeps the teacher's layer count and width); 0: off.", minimum=0.0
    )
    hidden_tokens: str = option(
        "line",
        "How the hidden-state loss weighs tokens: line (every line alike, its tokens 1/length each, as a mean-pooled embedding "
        "weighs them) or token (every real token alike: long lines dominate).",
        choices=HIDDEN_WEIGHTINGS,
    )
    refit: bool = option(
        True,
        "Before training, refit each pruned MLP's down projection by least squares to give the teacher's MLP output on --refit-samples "
        "training samples (closed form, before the first step).",
        flag="--refit/--no-refit",
    )
    refit_samples: int = option(512, "Training samples the least-squares refit is fitted on.", minimum=1)
    contrastive_weight: float = option(1.0, "Dual encoders trained on both towers: weight of the KL on the image-text similarity logits; 0: off.", minimum=0.0)
    temperature: float = option(2.0, "Temperature of the KL losses (classifier logits, image-text logits).", minimum=0.0, exclusive=("min",))
    holdout: float = option(0.1, "Fraction of the training data held out to stop early (at least one sample).", minimum=0.0, maximum=0.5, exclusive=("min",))
    eval_every: int = option(25, "Measure the fidelity on the held-out data every this many steps.", minimum=1)
    patience: int = option(4, "Stop when that fidelity has not improved for this many measurements; 0: never stop early.", minimum=0)
    max_length: int = option(128, "Longest training text in tokens; longer lines are truncated.", minimum=2)
    group_by_length: bool = option(
        True,
        "Text: batches of lines of similar length (less padding, more steps a minute), in shuffled order, as transformers' Trainer groups them.",
        flag="--group-by-length/--no-group-by-length",
    )
    seed: int = option(0, "Seed of the split, the order of the data and the run: the same seed gives the same weights.", minimum=0)
    tower: list[str] = option([], "Train only these towers (repeatable; default: every tower the data feeds).")
    checkpoint_every: int = option(50, "Write a resumable checkpoint every this many steps.", minimum=1, recorded=False)
    min_cosine: float | None = min_cosine_option(None)
    min_agreement: float | None = min_agreement_option(None)
    eval_images: str | None = eval_images_option()
    eval_text: str | None = eval_text_option()

    def check(self) -> None:
        if self.teacher == self.source:
            raise VlmoptError(f"--teacher and --from both name '{self.source}': the student learns from another artifact, usually --teacher hf")


# -- what is trained, on what -------------------------------------------------------------------
def _role(tower: Tower) -> str | None:
    roles = [spec.role for spec in tower.inputs]
    if roles == ["image"]:
        return "image"
    if tower.vocab is not None and set(roles) <= TEXT_ROLES:
        return "text"
    return None


@dataclass
class TowerPlan:
    """One trained tower: its declaration, the data that feeds it and that data's split."""

    tower: Tower
    role: str
    split: d.Split
    #: what the loss compares: an embedding (cosine/MSE) or logits (KL)
    target: str
    #: token counts of the tower's samples, where batches are grouped by length
    lengths: np.ndarray | None = None


def _check_match(student: dict[str, Tower], teacher: dict[str, Tower], student_name: str, teacher_name: str) -> None:
    if set(student) != set(teacher):
        raise VlmoptError(f"student '{student_name}' has towers {', '.join(student)} and teacher '{teacher_name}' {', '.join(teacher)}; they must match")
    for name, tower in student.items():
        other = teacher[name]
        mine = [(s.name, s.shape) for s in tower.outputs]
        theirs = [(s.name, s.shape) for s in other.outputs]
        if mine != theirs:
            raise VlmoptError(
                f"the {name} tower of student '{student_name}' gives {mine} and the teacher's {theirs}: distillation compares them, so they must have one shape"
            )
        if [s.name for s in tower.inputs] != [s.name for s in other.inputs] or (
            tower.vocab and other.vocab and tower.vocab.vocab_size != other.vocab.vocab_size
        ):
            raise VlmoptError(f"the {name} tower of student '{student_name}' does not take the teacher's inputs (a different tokenizer or vocabulary)")


@dataclass
class TrainingData:
    """The user's training data and the student's processors that make it into tower inputs."""

    options: DistillOptions
    folder: Path
    text: list[str] | None
    images: list[Path] | None
    tokenizer: Any
    processor: Any

    def feed(self, plan: TowerPlan, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The tower's inputs for samples `rows` of its data, through the student's own tokenizer or image processor."""
        tower = plan.tower
        if plan.role == "text":
            assert self.text is not None
            padding = text_padding(tower)
            limit = None if tower.vocab is None else tower.vocab.max_length if padding == "max_length" else min(self.options.max_length, tower.vocab.max_length)
            feed = encode_text([self.text[i] for i in rows], self.tokenizer, self.folder, tower, str(self.options.data_text), padding, limit)
        else:
            assert self.images is not None
            feed = {tower.inputs[0].name: process_images(d.load_images([self.images[i] for i in rows]), self.processor, self.folder)}
        check_fits(tower, feed, f"the training data through the processors in {self.folder}")
        return feed

    def lengths(self, plan: TowerPlan) -> np.ndarray | None:
        """Token counts of every training line of a text tower (None for images, which all have one size)."""
        if plan.role != "text" or self.text is None:
            return None
        ids = self.tokenizer(self.text, truncation=True, max_length=self.options.max_length)["input_ids"]
        return np.array([len(row) for row in ids], dtype=np.int64)


def _checkpoint_root(model_dir: ModelDir, name: str) -> Path:
    return model_dir.path / CHECKPOINTS / name


def run_key(recorded: dict[str, Any], student_digest: str, teacher_digest: str) -> str:
    """What a training run depends on: options that shape it, both artifacts, torch and transformers."""
    shaping = {k: v for k, v in recorded.items() if k not in _NOT_TRAINING}
    versions = tool_versions()
    payload = {
        "options": shaping,
        "student": student_digest,
        "teacher": teacher_digest,
        "torch": versions.get("torch"),
        "transformers": versions.get("transformers"),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class Distill(Stage):
    name = "distill"
    Options = DistillOptions
    produces = "hf"
    accepts = Accepts(kinds=("hf",), hint="distill a Hugging Face checkpoint such as 'hf-pruned' (made by `vlmopt prune`)")
    tools = ("torch", "transformers")
    summary = (
        "Train a pruned model to match the original on your unlabeled text/images (knowledge distillation): a checkpoint that reloads "
        "with from_pretrained, verified against the teacher on the built-in data, fidelity before and after recorded."
    )
    details = "Example: vlmopt distill build/minilm --data-text my-sentences.txt --steps 500   (Ctrl-C keeps the last checkpoint; run again to go on)"

    def reads(self, options: Any, artifacts: dict[str, str]) -> list[str]:
        return [options.source, options.teacher]

    # -- before any work ----------------------------------------------------------------------
    def prepare(self, job: Job) -> None:
        """Refuse what cannot be distilled before anything runs: the teacher, the pair's match, the data."""
        from vlmopt.families import family_for
        from vlmopt.hf import load_config

        options: DistillOptions = job.options
        student = job.parent
        assert student is not None
        teacher = job.model_dir.artifact(options.teacher)
        if teacher.kind != "hf":
            raise VlmoptError(f"--teacher reads a Hugging Face artifact; '{teacher.name}' is {teacher.kind} (give the original model, usually --teacher hf)")
        if teacher.stage in _STAGES_OF_DERIVED:
            raise VlmoptError(
                f"the teacher '{teacher.name}' is itself a {teacher.stage}d artifact of '{teacher.parent}'; distill from the original model: --teacher {teacher.parent}"
            )
        student_dir, teacher_dir = job.parent_dir, job.model_dir.artifact_path(teacher.name)
        student_config, teacher_config = load_config(student_dir), load_config(teacher_dir)
        family, teacher_family = family_for(student_config), family_for(teacher_config)
        if family.name != teacher_family.name:
            raise VlmoptError(
                f"student '{student.name}' is a {family.name} model and teacher '{teacher.name}' a {teacher_family.name} model; "
                "distillation needs one architecture family"
            )
        if family.generative:
            raise VlmoptError(f"distill trains encoder towers; {family.name} is a generative family, which it does not support yet")
        towers = {t.name: t for t in family.towers(student_config, student_dir)}
        _check_match(towers, {t.name: t for t in teacher_family.towers(teacher_config, teacher_dir)}, student.name, teacher.name)

        roles = {name: _role(t) for name, t in towers.items()}
        if not options.data_text and not options.data_images:
            kinds = " and ".join(sorted({f"--data-{r}{'s' if r == 'image' else ''}" for r in roles.values() if r}))
            raise VlmoptError(
                f"distill needs unlabeled training data ({kinds}); the built-in evaluation data is what verification judges on and is never trained on "
                "(README: `vlmopt distill`, no data of your own)"
            )
        for flag, value, role in (("--data-text", options.data_text, "text"), ("--data-images", options.data_images, "image")):
            if value and role not in roles.values():
                raise VlmoptError(f"{flag} was given, but this model has no {role} tower (it has {', '.join(towers)}); drop it")
        fed = [n for n, r in roles.items() if (r == "text" and options.data_text) or (r == "image" and options.data_images)]
        unknown = [t for t in options.tower if t not in towers]
        if unknown:
            raise VlmoptError(f"no tower named {', '.join(unknown)} in this {family.name} model (towers: {', '.join(towers)})")
        starved = [t for t in options.tower if t not in fed]
        if starved:
            flag = "--data-images" if roles[starved[0]] == "image" else "--data-text"
            raise VlmoptError(f"--tower {starved[0]}: no training data feeds it; give {flag}")
        chosen = list(dict.fromkeys(options.tower or fed))

        tokenizer, processor = saved_processors(student_dir)
        text = images = None
        if options.data_text and any(roles[t] == "text" for t in chosen):
            if tokenizer is None:
                raise VlmoptError(f"--data-text needs the model's tokenizer, and {student_dir} has none that loads; re-export from a checkpoint that ships one")
            text = d.read_text(Path(options.data_text))
        if options.data_images and any(roles[t] == "image" for t in chosen):
            if processor is None:
                raise VlmoptError(f"--data-images needs the model's image processor, and {student_dir} has none; re-export from a checkpoint that ships one")
            images = d.image_files(Path(options.data_images))
        data = TrainingData(options, student_dir, text, images, tokenizer, processor)
        plans: dict[str, TowerPlan] = {}
        for name in chosen:
            tower, role = towers[name], roles[name]
            count = len(text if role == "text" else images)  # type: ignore[arg-type]
            what = f"--data-{'text' if role == 'text' else 'images'} {options.data_text if role == 'text' else options.data_images}"
            target = "logits" if tower.outputs[0].name == "logits" else "embedding"
            plans[name] = TowerPlan(tower, role, d.split(count, options.holdout, options.seed, what), target)
            # the first samples through the processors now: data the model cannot take is refused before training
            data.feed(plans[name], np.arange(min(2, count)))
            if options.group_by_length:
                plans[name].lengths = data.lengths(plans[name])
        untrained = [t for t in student.record.get("pruned_towers", []) if t not in chosen]
        for name in untrained:
            flag = "--data-images" if roles.get(name) == "image" else "--data-text"
            job.warn(f"the {name} tower was pruned but gets no training data ({flag}): it stays as pruned")
        job.state.update(
            family=family,
            towers=towers,
            plans=plans,
            teacher=teacher,
            teacher_dir=teacher_dir,
            training_data=data,
            layout=family.pruning(student_config),
        )
        job.recorded["tower"] = chosen
        job.recorded["teacher_digest"] = teacher.digest

    def verified_towers(self, job: Job) -> dict[str, Tower]:
        return job.state["towers"]

    # -- the work ---------------------------------------------------------------------------------
    def build(self, job: Job, tmp: Path) -> StageOutput:
        import torch

        from vlmopt.hf import load_config, load_model

        options: DistillOptions = job.options
        family, towers, plans, teacher_artifact = job.state["family"], job.state["towers"], job.state["plans"], job.state["teacher"]
        torch.set_num_threads(job.context.thread_count)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        job.say("loading the teacher and the student")
        teacher = load_model(job.state["teacher_dir"], family=family, attn_implementation="sdpa").to(device)
        student = load_model(job.parent_dir, family=family, attn_implementation="sdpa").to(device)
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)

        job.say(f"measuring the student against '{teacher_artifact.name}' before training")
        before = self._verify(job, towers, teacher, student, gated=False)

        recorded = {**opts.recorded(options), **job.recorded}
        key = run_key(recorded, job.parent.digest, teacher_artifact.digest)  # type: ignore[union-attr]
        root = _checkpoint_root(job.model_dir, self.artifact_name(options))
        checkpoints = d.Checkpoints(root / key[:16], root.parent)
        training = Training(job, family, plans, teacher, student, device, checkpoints)
        record = training.run()
        del teacher

        job.say("saving and reloading with from_pretrained")
        student.save_pretrained(tmp)
        for item in job.parent_dir.iterdir():
            if item.name in _WEIGHT_FILES or (tmp / item.name).exists():
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
            else:
                shutil.copy2(item, tmp / item.name)
        del student
        reloaded = load_model(tmp, config=load_config(tmp), family=family, attn_implementation="eager")
        reference = load_model(job.state["teacher_dir"], family=family, attn_implementation="eager")
        job.say(f"checking the distilled model against '{teacher_artifact.name}'")
        after = self._verify(job, towers, reference, reloaded, gated=True)
        record.update(
            {
                "teacher": teacher_artifact.name,
                "student": job.parent.name,  # type: ignore[union-attr]
                "fidelity": {"before": fidelity(before), "after": fidelity(after)},
                "distilled_towers": list(plans),
                "fine_tuned": True,
            }
        )
        return StageOutput(traits=job.parent.traits.derive(), record=record, verification=after)  # type: ignore[union-attr]

    def _verify(self, job: Job, towers: dict[str, Tower], teacher: Any, student: Any, gated: bool) -> Verification:
        from vlmopt.verification import Gates, verify_runners

        device = str(next(student.parameters()).device)

        def runner(model: Any) -> Any:
            return lambda tower: TorchRunner(towers[tower.name].wrap(model), [s.name for s in tower.inputs], [s.name for s in tower.outputs], device=device)

        gates = Gates.of(job.options) if gated else Gates()
        return verify_runners(towers, runner(teacher), runner(student), gates, job.state["teacher"].name, data=job.state.get("data"))

    def _run_locked(self, model_dir: ModelDir, options: Any, context: RunContext) -> StageResult:
        result = super()._run_locked(model_dir, options, context)
        if not result.skipped:
            root = _checkpoint_root(model_dir, self.artifact_name(options))
            d.Checkpoints(root, root.parent).remove()
        return result

    def describe(self, artifact: Any) -> list[Any]:
        from rich.table import Table

        record = artifact.record
        fidelity_record = record.get("fidelity", {})
        before, after = fidelity_record.get("before", {}), fidelity_record.get("after", {})
        table = Table(title=f"fidelity against the teacher '{record.get('teacher')}' (built-in real data)", title_justify="left")
        for column in ("measure", "pruned (before)", "distilled (after)"):
            table.add_column(column, justify="left" if column == "measure" else "right")
        for tower, value in after.get("cosine_min", {}).items():
            table.add_row(f"{tower} cosine min", _fmt(before.get("cosine_min", {}).get(tower)), _fmt(value))
        for name, value in after.get("metrics", {}).items():
            table.add_row(name, _fmt(before.get("metrics", {}).get(name)), _fmt(value))
        training = record.get("training", {})
        line = (
            f"trained {training.get('steps_done')} of {training.get('steps')} steps ({training.get('stopped')}), best held-out step {training.get('best_step')}, "
            f"{training.get('seconds', 0):.0f} s on {training.get('device')}"
        )
        if training.get("resumed_from"):
            line += f", resumed from step {training['resumed_from']}"
        return [table, line]


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def fidelity(verification: Verification) -> dict[str, Any]:
    """The figures the record keeps of a verification: worst gated cosine per tower, and the task metrics."""
    cosines: dict[str, float] = {}
    for tower, output in verification.gated_outputs():
        cosines[tower] = min(cosines.get(tower, 1.0), output.cosine_min)
    return {"cosine_min": cosines, "metrics": {m.name: m.value for m in verification.metrics}, "worst_cosine": verification.worst_cosine()}


# -- the training loop --------------------------------------------------------------------------
class _Hidden:
    """Forward hooks that keep the output of every block of a tower (its hidden states) for the hidden-state loss."""

    def __init__(self, blocks: list[Any]):
        self.outputs: list[Any] = []
        #: only the training forward passes keep outputs (not the held-out measurements)
        self.enabled = False
        self.handles = [b.module.register_forward_hook(self._keep) for b in blocks]

    def _keep(self, module: Any, args: Any, output: Any) -> None:
        if self.enabled:
            self.outputs.append(output[0] if isinstance(output, tuple) else output)

    def take(self) -> list[Any]:
        taken, self.outputs = self.outputs, []
        return taken

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


class Training:
    """One training run of a student against its teacher: resumable, bounded by steps, minutes and patience."""

    def __init__(self, job: Job, family: Any, plans: dict[str, TowerPlan], teacher: Any, student: Any, device: str, checkpoints: d.Checkpoints):
        self.job, self.options = job, job.options
        self.family, self.plans, self.device = family, plans, device
        self.teacher, self.student = teacher, student
        self.checkpoints = checkpoints
        self.wrapped = {n: (p.tower.wrap(teacher), p.tower.wrap(student)) for n, p in plans.items()}

    def _tensors(self, feed: dict[str, np.ndarray], tower: Tower) -> list[Any]:
        import torch

        return [torch.from_numpy(np.ascontiguousarray(feed[s.name])).to(self.device) for s in tower.inputs]

    def _batch(self, name: str, rows: np.ndarray) -> dict[str, np.ndarray]:
        return self.job.state["training_data"].feed(self.plans[name], rows)

    def _hidden_pairs(self) -> dict[str, tuple[_Hidden, _Hidden] | None]:
        """Hooks on each trained tower's blocks where student and teacher have as many blocks (else no hidden-state loss)."""
        from vlmopt.stages.prune import find_blocks

        layout = self.job.state["layout"]
        pairs: dict[str, tuple[_Hidden, _Hidden] | None] = {}
        self.hidden_note: dict[str, str] = {}
        for name, (teacher, student) in self.wrapped.items():
            if not self.options.hidden_weight:
                pairs[name], self.hidden_note[name] = None, "off (--hidden-weight 0)"
                continue
            if layout is None:
                pairs[name], self.hidden_note[name] = None, f"off: vlmopt does not know the blocks of {self.family.name} models"
                continue
            t_blocks, s_blocks = find_blocks(teacher, layout), find_blocks(student, layout)
            if len(t_blocks) != len(s_blocks) or not t_blocks:
                pairs[name], self.hidden_note[name] = None, f"off: the student has {len(s_blocks)} blocks, the teacher {len(t_blocks)}"
                continue
            pairs[name], self.hidden_note[name] = (_Hidden(t_blocks), _Hidden(s_blocks)), f"{len(s_blocks)} blocks, weighted by {self.options.hidden_tokens}"
        return pairs

    def _refit(self) -> dict[str, Any]:
        """The least-squares start (`distillation.refit_down_projections`) of every tower whose MLPs were pruned."""
        import torch

        from vlmopt.stages.prune import find_blocks

        layout, options = self.job.state["layout"], self.options
        done: dict[str, Any] = {}
        for name, (teacher, student) in self.wrapped.items():
            if layout is None:
                continue
            t_blocks, s_blocks = find_blocks(teacher, layout), find_blocks(student, layout)
            if len(t_blocks) != len(s_blocks):
                continue
            pairs = [
                (s.mlp[1], t.mlp[1])
                for s, t in zip(s_blocks, t_blocks, strict=True)
                if s.mlp is not None and t.mlp is not None and s.mlp[1].in_features < t.mlp[1].in_features
            ]
            if not pairs:
                continue
            plan = self.plans[name]
            picked = np.random.default_rng([options.seed, 4]).permutation(plan.split.train)[: options.refit_samples]
            if plan.lengths is not None:
                picked = picked[np.argsort(plan.lengths[picked], kind="stable")]
            feeds = [self._batch(name, picked[i : i + options.batch_size]) for i in range(0, len(picked), options.batch_size)]
            masks = [torch.from_numpy(f["attention_mask"]) if "attention_mask" in f else None for f in feeds]

            def runner(which: int, name: str = name, feeds: list[dict[str, np.ndarray]] = feeds) -> Any:
                return lambda index: self.wrapped[name][which](*self._tensors(feeds[index], self.plans[name].tower))

            self.job.say(f"refitting the {len(pairs)} pruned MLPs of the {name} tower by least squares on {len(picked)} training samples")
            errors = d.refit_down_projections(pairs, runner(0), runner(1), masks)
            done[name] = {"blocks": len(pairs), "samples": int(len(picked)), "relative_error": [round(e, 5) for e in errors]}
        return done

    def _held_out(self) -> dict[str, tuple[list[dict[str, np.ndarray]], list[Any]]]:
        """Per tower: held-out batches and the teacher's outputs on them (computed once)."""
        import torch

        held: dict[str, tuple[list[dict[str, np.ndarray]], list[Any]]] = {}
        for name, plan in self.plans.items():
            rows = plan.split.held_out[:MAX_HELD_OUT]
            feeds = [self._batch(name, rows[i : i + self.options.batch_size]) for i in range(0, len(rows), self.options.batch_size)]
            with torch.no_grad():
                outputs = [self.wrapped[name][0](*self._tensors(f, plan.tower)) for f in feeds]
            held[name] = (feeds, outputs)
        return held

    def _score(self, held: dict[str, tuple[list[dict[str, np.ndarray]], list[Any]]]) -> dict[str, dict[str, float]]:
        """Cosine mean and min of the student's outputs against the teacher's on the held-out data, per tower."""
        import torch

        scores = {}
        with torch.no_grad():
            for name, (feeds, expected) in held.items():
                cosines = torch.cat(
                    [
                        torch.nn.functional.cosine_similarity(self.wrapped[name][1](*self._tensors(f, self.plans[name].tower)), e, dim=-1)
                        for f, e in zip(feeds, expected, strict=True)
                    ]
                )
                scores[name] = {"cosine_mean": float(cosines.mean()), "cosine_min": float(cosines.min())}
        return scores

    def _loss(self, step: int, hidden: dict[str, tuple[_Hidden, _Hidden] | None]) -> tuple[Any, dict[str, float]]:
        import torch

        options = self.options
        total: Any = 0.0
        parts: dict[str, float] = {}
        embeddings: dict[str, tuple[Any, Any]] = {}
        for name, plan in self.plans.items():
            rows = d.batch_indices(plan.split.train, options.batch_size, step, options.seed, plan.lengths)
            feed = self._batch(name, rows)
            inputs = self._tensors(feed, plan.tower)
            teacher, student = self.wrapped[name]
            pair = hidden.get(name)
            if pair is not None:
                pair[0].enabled = pair[1].enabled = True
            try:
                with torch.no_grad():
                    expected = teacher(*inputs)
                got = student(*inputs)
            finally:
                if pair is not None:
                    pair[0].enabled = pair[1].enabled = False
            loss = d.logits_kl(got, expected, options.temperature) if plan.target == "logits" else d.embedding_loss(got, expected, options.loss)
            parts[name] = float(loss.detach())
            total = total + loss
            if pair is not None:
                mask = torch.from_numpy(feed["attention_mask"]).to(self.device) if "attention_mask" in feed else None
                layers = d.hidden_loss(pair[1].take(), pair[0].take(), mask, options.hidden_tokens)
                parts[f"{name} hidden"] = float(layers.detach())
                total = total + options.hidden_weight * layers
            embeddings[name] = (got, expected)
        if options.contrastive_weight and self._contrastive_pair():
            vision, text = self._contrastive_pair()  # type: ignore[misc]
            contrastive = d.contrastive_kl(embeddings[vision][0], embeddings[text][0], embeddings[vision][1], embeddings[text][1], options.temperature)
            parts["contrastive"] = float(contrastive.detach())
            total = total + options.contrastive_weight * contrastive
        return total, parts

    def _contrastive_pair(self) -> tuple[str, str] | None:
        """(image tower, text tower) of a dual encoder trained on both, whose embeddings meet in one space."""
        images = [n for n, p in self.plans.items() if p.role == "image" and p.target == "embedding"]
        texts = [n for n, p in self.plans.items() if p.role == "text" and p.target == "embedding"]
        if len(images) == 1 and len(texts) == 1 and self.plans[images[0]].tower.outputs[0].shape[-1] == self.plans[texts[0]].tower.outputs[0].shape[-1]:
            return images[0], texts[0]
        return None

    def run(self) -> dict[str, Any]:
        """Train (or go on from the last checkpoint), leave the best held-out weights in the student, and say what happened."""
        import torch
        from transformers import get_cosine_schedule_with_warmup

        options, job = self.options, self.job
        torch.manual_seed(options.seed)
        self.student.train(False)  # no dropout: the target is the teacher's own outputs, and the run stays deterministic
        for parameter in self.student.parameters():
            parameter.requires_grad_(False)
        # token and position embeddings stay the teacher's: pruning leaves them as they were, and training them on a
        # small corpus would move only the rows of the tokens it happens to hold
        frozen = {id(p) for name, (_, student) in self.wrapped.items() for m in student.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
        trainable = {}
        for name, (_, student) in self.wrapped.items():
            for key, parameter in student.named_parameters():
                if id(parameter) not in frozen:
                    trainable[f"{name}.{key}"] = parameter
        for parameter in trainable.values():
            parameter.requires_grad_(True)
        parameters = list(dict.fromkeys(trainable.values()))
        optimizer = torch.optim.AdamW(parameters, lr=options.lr, weight_decay=0.01)
        warmup = int(round(options.warmup * options.steps))

        resumed = self.checkpoints.latest()
        state: dict[str, Any] = {"step": 0, "seconds": 0.0, "best_score": None, "best_step": 0, "bad": 0, "history": [], "finished": None}
        best: dict[str, Any] | None = None
        if resumed is not None:
            missing = set(trainable) ^ set(resumed.student)
            if missing:
                raise VlmoptError(
                    f"the training checkpoint {resumed.folder} does not fit this student ({len(missing)} tensors differ); remove it to start over"
                )
            with torch.no_grad():
                for key, value in resumed.student.items():
                    trainable[key].copy_(value)
            optimizer.load_state_dict(resumed.optimizer)
            state, best = resumed.state, resumed.best
            job.say(f"resuming from the checkpoint of step {state['step']}")
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, options.steps, last_epoch=state["step"] - 1 if state["step"] else -1)
        resumed_from = state["step"] if resumed is not None else None

        if resumed is None and options.refit:
            state["refit"] = self._refit()
        hidden = self._hidden_pairs()
        try:
            held = self._held_out()
            if state["best_score"] is None:
                scores = self._score(held)
                state["best_score"] = _score(scores)
                state["history"].append({"step": 0, "held_out": scores})
                # the pruned student itself is the best until training beats it on the held-out data
                best = {k: v.detach().clone() for k, v in trainable.items()}
            last_saved = state["step"]
            started = time.perf_counter()
            seconds_before = state["seconds"]
            limit = options.minutes * 60 if options.minutes else None
            try:
                while state["finished"] is None:
                    if state["step"] >= options.steps:
                        state["finished"] = "steps"
                        break
                    if limit is not None and state["seconds"] >= limit:
                        state["finished"] = "minutes"
                        break
                    loss, parts = self._loss(state["step"], hidden)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
                    optimizer.step()
                    scheduler.step()
                    state["step"] += 1
                    state["seconds"] = seconds_before + time.perf_counter() - started
                    step = state["step"]
                    if step % options.eval_every == 0 or step == options.steps:
                        scores = self._score(held)
                        score = _score(scores)
                        state["history"].append({"step": step, "loss": float(loss.detach()), "parts": parts, "held_out": scores})
                        if score > state["best_score"]:
                            state["best_score"], state["best_step"], state["bad"] = score, step, 0
                            best = {k: v.detach().clone() for k, v in trainable.items()}
                        else:
                            state["bad"] += 1
                            if options.patience and state["bad"] >= options.patience:
                                state["finished"] = "early stopping"
                    if step - last_saved >= options.checkpoint_every or state["finished"]:
                        self._save(state, trainable, optimizer, best)
                        last_saved = step
                    job.say(_progress(state, options, float(loss.detach())))
            except KeyboardInterrupt:
                kept = self.checkpoints.complete()
                where = f"the checkpoint of step {int(kept[-1].name[len(d.CHECKPOINT_PREFIX) :])} is kept" if kept else "no checkpoint was written yet"
                raise Interrupted(f"distill stopped at step {state['step']}; nothing was committed, {where}: run the same command again to go on") from None
            if state["step"] != last_saved or resumed is None:
                self._save(state, trainable, optimizer, best)
        finally:
            for pair in hidden.values():
                if pair is not None:
                    pair[0].close()
                    pair[1].close()
        if best is not None and state["best_step"] != state["step"]:
            with torch.no_grad():
                for key, value in best.items():
                    trainable[key].copy_(value)
        for parameter in trainable.values():
            parameter.requires_grad_(False)
        return {
            "training": {
                "steps": options.steps,
                "steps_done": state["step"],
                "stopped": state["finished"],
                "best_step": state["best_step"],
                "best_held_out": state["history"][[h["step"] for h in state["history"]].index(state["best_step"])]["held_out"],
                "resumed_from": resumed_from,
                "refit": state.get("refit"),
                "seconds": round(state["seconds"], 1),
                "device": self.device,
                "optimizer": "torch.optim.AdamW (weight decay 0.01, gradient norm clipped at 1)",
                "schedule": f"transformers get_cosine_schedule_with_warmup ({warmup} warm-up steps)",
                "history": state["history"],
            },
            "towers": {
                name: {
                    "data": f"{len(p.split.train) + len(p.split.held_out)} {'lines' if p.role == 'text' else 'images'} "
                    f"({len(p.split.train)} trained on, {len(p.split.held_out)} held out)",
                    "loss": f"KL at temperature {options.temperature:g}" if p.target == "logits" else options.loss,
                    "hidden_states": self.hidden_note.get(name),
                    "batches": "grouped by length (shuffled)" if p.lengths is not None else "random",
                }
                for name, p in self.plans.items()
            },
            **(
                {"contrastive": f"KL on image-text logits at temperature {options.temperature:g}"}
                if options.contrastive_weight and self._contrastive_pair()
                else {}
            ),
        }

    def _save(self, state: dict[str, Any], trainable: dict[str, Any], optimizer: Any, best: dict[str, Any] | None) -> None:
        self.checkpoints.save(dict(state), trainable, optimizer.state_dict(), best)


def _score(scores: dict[str, dict[str, float]]) -> float:
    return float(np.mean([s["cosine_mean"] for s in scores.values()]))


def _progress(state: dict[str, Any], options: DistillOptions, loss: float) -> str:
    done, total = state["step"], options.steps
    filled = int(20 * done / total)
    bar = "█" * filled + "░" * (20 - filled)
    rate = state["seconds"] / max(done, 1)
    remaining = (total - done) * rate
    if options.minutes:
        remaining = min(remaining, max(0.0, options.minutes * 60 - state["seconds"]))
    best = state["best_score"]
    held = "" if best is None or math.isnan(best) else f" · best held-out cosine {best:.4f}"
    return f"distilling {bar} {done}/{total} · loss {loss:.4f}{held} · ~{remaining / 60:.1f} min left"


STAGE = Distill()
