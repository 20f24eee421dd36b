"""What `vlmopt distill` trains with: the user's unlabeled data, the losses, and crash-safe training checkpoints.

Data: the user's text (one sentence a line) and images (a folder), never the built-in evaluation data, split
once into a training part and a held-out part (early stopping) by the seed. The batch of a step is a function of
(seed, step) alone, so a resumed run sees exactly the batches an uninterrupted one would.

Losses, per tower, on what the tower serves (`Tower.outputs[0]`):
- an embedding: `cosine` (1 - cosine, the default: verification and retrieval judge the direction) or `mse`
  (relative: divided by the teacher's mean square, so one weight fits every model);
- logits (a classifier): KL divergence between the softened distributions, times T² (Hinton et al., 2015);
- hidden states: relative MSE between the outputs of every transformer block, where student and teacher have the
  same number of blocks of the same width (structured pruning keeps both), every line weighing the same (its tokens
  1/length each, as in a mean-pooled embedding) unless asked to weigh every token alike;
- dual encoders: KL between the teacher's and the student's image-text similarity logits over the batch, both
  directions (the contrastive logits the towers are used through), at CLIP's trained logit scale over T.

Checkpoints (`Checkpoints`): a folder per checkpoint (`step-0000100/`: the student's weights, AdamW's state and the
best weights so far in safetensors, the loop's state in JSON), written under a temporary name and renamed into
place, so a kill leaves only complete ones; older ones are removed once the new one is in place.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlmopt.calibration import IMAGE_SUFFIXES, MAX_IMAGE_PIXELS, read_lines
from vlmopt.errors import VlmoptError
from vlmopt.workspace import fsync_path

#: most lines read from --data-text, and images from --data-images
MAX_TEXT_SAMPLES = 200_000
MAX_IMAGE_SAMPLES = 20_000
#: CLIP's trained logit scale (exp(4.6052)); the contrastive logits are cosine x this / temperature
CONTRASTIVE_SCALE = 100.0
CHECKPOINT_PREFIX = "step-"
_PARTIAL_PREFIX = ".partial-"


# -- data ---------------------------------------------------------------------------------------
@dataclass
class Split:
    """Indices of the training part and the held-out part of one kind of data."""

    train: np.ndarray
    held_out: np.ndarray


def split(count: int, holdout: float, seed: int, what: str) -> Split:
    """A seeded split of `count` samples: round(count x holdout) held out, at least 1 of each part."""
    if count < 2:
        raise VlmoptError(f"{what} holds {count} usable sample; distill needs at least 2 (one to train on, one held out to stop early)")
    order = np.random.default_rng([seed, 1]).permutation(count)
    held = min(count - 1, max(1, int(round(count * holdout))))
    return Split(np.sort(order[held:]), np.sort(order[:held]))


def batch_indices(train: np.ndarray, batch: int, step: int, seed: int, lengths: np.ndarray | None = None) -> np.ndarray:
    """The training samples of step `step` (from 0): consecutive slices of a fresh seeded order per epoch (see `epoch_order`).

    A function of (seed, step) alone: a resumed run sees the batches an uninterrupted one would."""
    count = len(train)
    positions = step * batch + np.arange(batch)
    epochs, offsets = np.divmod(positions, count)
    picked = np.empty(batch, dtype=np.int64)
    for epoch in np.unique(epochs):
        order = epoch_order(count, batch, seed, int(epoch), None if lengths is None else lengths[train])
        picked[epochs == epoch] = order[offsets[epochs == epoch]]
    return train[picked]


#: batches per group sorted by length (transformers' Trainer sorts groups of 50 batches for --group_by_length)
LENGTH_GROUP_BATCHES = 50


def epoch_order(count: int, batch: int, seed: int, epoch: int, lengths: np.ndarray | None = None) -> np.ndarray:
    """A seeded permutation of `count` samples for one epoch. With `lengths`, grouped by length as transformers' Trainer
    does with `group_by_length`: the permutation is cut into groups of LENGTH_GROUP_BATCHES batches, each group sorted by
    length and cut into batches, whose order is then shuffled (a batch of short lines pads to a short length, and the
    steps do not run from long to short)."""
    order = np.random.default_rng([seed, 2, epoch]).permutation(count)
    if lengths is None:
        return order
    group = batch * LENGTH_GROUP_BATCHES
    grouped = np.concatenate([chunk[np.argsort(-lengths[chunk], kind="stable")] for chunk in np.split(order, range(group, count, group))])
    units = np.split(grouped, range(batch, count, batch))
    shuffle = np.random.default_rng([seed, 3, epoch]).permutation(len(units))
    return np.concatenate([units[i] for i in shuffle])


def read_text(path: Path) -> list[str]:
    """The non-blank lines of --data-text (UTF-8); an empty or unreadable file is refused."""
    return read_lines(path, "--data-text", MAX_TEXT_SAMPLES)


def image_files(folder: Path) -> list[Path]:
    """The images of --data-images, every one opened and checked (unreadable or oversized files are refused by name)."""
    from PIL import Image, UnidentifiedImageError

    if not folder.is_dir():
        raise VlmoptError(f"--data-images {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)[:MAX_IMAGE_SAMPLES]
    if not files:
        raise VlmoptError(f"--data-images {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); add some or drop the option")
    for path in files:
        try:
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise VlmoptError(f"training image {path} is {width}x{height} pixels, above the {MAX_IMAGE_PIXELS / 1e6:.0f} MP limit; resize or remove it")
                image.verify()
        except VlmoptError:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise VlmoptError(f"training image {path} cannot be read ({str(exc).splitlines()[0][:120]}); fix or remove it") from exc
    return files


def load_images(files: list[Path]) -> list[Any]:
    from PIL import Image

    images = []
    for path in files:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images


# -- losses -------------------------------------------------------------------------------------
def embedding_loss(student: Any, teacher: Any, kind: str) -> Any:
    """1 - cosine (mean over rows), or MSE relative to the teacher's mean square."""
    import torch

    if kind == "cosine":
        return (1 - torch.nn.functional.cosine_similarity(student, teacher, dim=-1)).mean()
    return ((student - teacher) ** 2).mean() / (teacher**2).mean().clamp_min(1e-12)


def logits_kl(student: Any, teacher: Any, temperature: float) -> Any:
    """KL(teacher || student) of the distributions softened by `temperature`, times temperature² (Hinton et al.)."""
    import torch.nn.functional as F

    return F.kl_div(F.log_softmax(student / temperature, dim=-1), F.log_softmax(teacher / temperature, dim=-1), log_target=True, reduction="batchmean") * (
        temperature**2
    )


def hidden_loss(student: list[Any], teacher: list[Any], mask: Any | None, weighting: str = "line") -> Any:
    """Mean over blocks of the squared error between their outputs relative to the teacher's mean square; padding left out.

    `weighting` "line": every sample weighs the same, its tokens 1/length each, as in a mean-pooled embedding (a short
    line's few tokens, mostly [CLS] and [SEP], count as much as a long line's many); "token": every real token alike."""
    import torch

    total = 0.0
    for s, t in zip(student, teacher, strict=True):
        if mask is not None and s.dim() == 3 and s.shape[:2] == mask.shape:
            keep = mask.to(s.dtype)
            if weighting == "line":
                keep = keep / keep.sum(dim=1, keepdim=True).clamp_min(1)
            error, scale = (((s - t) ** 2).sum(-1) * keep).sum(), ((t**2).sum(-1) * keep).sum()
        else:
            error, scale = ((s - t) ** 2).sum(), (t**2).sum()
        total = total + error / torch.clamp_min(scale, 1e-12)
    return total / max(1, len(student))


def contrastive_kl(student_images: Any, student_texts: Any, teacher_images: Any, teacher_texts: Any, temperature: float) -> Any:
    """KL between the teacher's and the student's image-text similarity logits over the batch, both directions."""
    import torch.nn.functional as F

    def logits(images: Any, texts: Any) -> Any:
        return F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T * CONTRASTIVE_SCALE

    student, teacher = logits(student_images, student_texts), logits(teacher_images, teacher_texts)
    return (logits_kl(student, teacher, temperature) + logits_kl(student.T, teacher.T, temperature)) / 2


# -- checkpoints --------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """A complete checkpoint read back: the loop's state, the student's weights, AdamW's state, the best weights."""

    folder: Path
    state: dict[str, Any]
    student: dict[str, Any]
    optimizer: dict[str, Any]
    best: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def optimizer_tensors(state_dict: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A torch optimizer's state dict as flat tensors (safetensors) and the JSON rest (param groups, which keys are scalars)."""
    import torch

    tensors: dict[str, Any] = {}
    for index, entry in state_dict["state"].items():
        for key, value in entry.items():
            tensors[f"{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, {"param_groups": state_dict["param_groups"]}


def optimizer_state(tensors: dict[str, Any], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": rest["param_groups"]}


class Checkpoints:
    """The checkpoints of one training run in `folder`, somewhere under `root` (which holds nothing else of vlmopt's)."""

    def __init__(self, folder: Path, root: Path):
        self.folder, self.root = folder, root

    def complete(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX))

    def latest(self) -> Checkpoint | None:
        """The newest complete checkpoint, or None; partial ones a kill left are removed."""
        from safetensors.torch import load_file

        for partial in self.folder.glob(f"{_PARTIAL_PREFIX}*") if self.folder.is_dir() else []:
            shutil.rmtree(partial, ignore_errors=True)
        found = self.complete()
        if not found:
            return None
        folder = found[-1]
        try:
            state = json.loads((folder / "state.json").read_text())
            optimizer = optimizer_state(load_file(folder / "optimizer.safetensors"), state.pop("optimizer"))
            best = load_file(folder / "best.safetensors") if (folder / "best.safetensors").is_file() else None
            return Checkpoint(folder, state, load_file(folder / "student.safetensors"), optimizer, best)
        except (OSError, ValueError, KeyError) as exc:
            raise VlmoptError(f"the training checkpoint {folder} cannot be read ({str(exc).splitlines()[0][:160]}); remove it to start over") from exc

    def save(self, state: dict[str, Any], student: dict[str, Any], optimizer: dict[str, Any], best: dict[str, Any] | None) -> Path:
        """Write a checkpoint of step `state["step"]` completely, then rename it into place and drop the older ones.

        A write that fails (a full disk) removes what it wrote and raises VlmoptError; the last complete checkpoint stays."""
        from safetensors.torch import save_file

        final = self.folder / f"{CHECKPOINT_PREFIX}{state['step']:07d}"
        partial = self.folder / f"{_PARTIAL_PREFIX}{state['step']:07d}-{secrets.token_hex(4)}"
        tensors, rest = optimizer_tensors(optimizer)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            partial.mkdir()
            save_file({k: v.detach().contiguous() for k, v in student.items()}, partial / "student.safetensors")
            save_file({k: v.contiguous() for k, v in tensors.items()}, partial / "optimizer.safetensors")
            if best is not None:
                save_file({k: v.contiguous() for k, v in best.items()}, partial / "best.safetensors")
            (partial / "state.json").write_text(json.dumps({**state, "optimizer": rest}, sort_keys=True))
            for item in partial.iterdir():
                fsync_path(item)
            fsync_path(partial)
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
            fsync_path(self.folder)
        except Exception as exc:
            shutil.rmtree(partial, ignore_errors=True)
            if not isinstance(exc, OSError) and not _is_space_error(exc):
                raise
            kept = [p.name for p in self.complete() if p != final]
            if not kept:
                self.remove()
            what = f"the last complete one, {self.folder / kept[-1]}, is kept" if kept else "no earlier checkpoint exists"
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0][:160]
            raise VlmoptError(f"cannot write a training checkpoint to {self.folder}: {reason}; {what}; free some space and run again") from exc
        for older in self.complete():
            if older != final:
                shutil.rmtree(older, ignore_errors=True)
        return final

    def remove(self) -> None:
        """Remove this run's checkpoints, and the folders above it up to `root` that this leaves empty."""
        shutil.rmtree(self.folder, ignore_errors=True)
        folder = self.folder
        while folder != self.root and self.root in folder.parents:
            folder = folder.parent
            with contextlib.suppress(OSError):
                folder.rmdir()


def _is_space_error(exc: BaseException) -> bool:
    text = str(exc)
    return any(words in text for words in ("No space left", "File too large", "Disk quota", "os error 28", "os error 27"))


# -- least-squares start ------------------------------------------------------------------------
def refit_down_projections(pairs: list[tuple[Any, Any]], run_teacher: Any, run_student: Any, masks: list[Any | None], ridge: float = 1e-4) -> list[float]:
    """Refit each pruned MLP's down projection, block by block, so that it gives what the teacher's full MLP gives.

    `pairs`: (student down Linear, teacher down Linear) per block, in the order the model runs them; `run_teacher(i)` and
    `run_student(i)` run the models on batch i of the fitting data; `masks[i]` marks its real tokens (None: every
    position). For block b the student's remaining neurons (its down projection's input, from the student's own earlier
    blocks, already refitted) are regressed, by ridge-regularized least squares in float64, on the teacher's down
    projection output at the same block: the closed-form reconstruction with which post-training pruning methods
    (Kwon et al. 2022, "A Fast Post-Training Pruning Framework for Transformers"; FLAP's bias compensation) recover a
    pruned layer's output without training. Every sample weighs the same, its tokens 1/length each, as in a
    mean-pooled embedding: a short line's few tokens (mostly [CLS] and [SEP]) count as much as a long line's many.
    Returns each block's relative (weighted) error of the fit.
    """
    import torch

    def rows(value: Any, mask: Any | None) -> tuple[Any, Any | None]:
        """Real tokens as rows (float64, on the CPU), and the square root of each row's weight."""
        if mask is not None and value.dim() == 3 and value.shape[:2] == mask.shape:
            mask = mask.to(value.device).double()
            keep = mask.bool()
            weight = (mask / mask.sum(dim=1, keepdim=True).clamp_min(1))[keep].sqrt().unsqueeze(1).cpu()
            return value[keep].double().cpu(), weight
        return value.reshape(-1, value.shape[-1]).double().cpu(), None

    # the teacher's outputs once for every block (it does not change), then the student block by block
    targets: list[list[Any]] = [[] for _ in pairs]
    hooks = [
        teacher_down.register_forward_hook(lambda m, args, out, kept=kept: kept.append(out.detach()))
        for (_, teacher_down), kept in zip(pairs, targets, strict=True)
    ]
    try:
        with torch.no_grad():
            for index, mask in enumerate(masks):
                run_teacher(index)
                for kept in targets:
                    kept[-1] = rows(kept[-1], mask)[0].float()
    finally:
        for hook in hooks:
            hook.remove()

    errors: list[float] = []
    for (student_down, _), block_targets in zip(pairs, targets, strict=True):
        inputs: list[Any] = []
        hook = student_down.register_forward_hook(lambda m, args, out, kept=inputs: kept.append(args[0].detach()))
        bias = student_down.bias is not None
        width = student_down.in_features + bias
        gram = torch.zeros(width, width, dtype=torch.float64)
        cross = torch.zeros(width, block_targets[0].shape[-1], dtype=torch.float64)
        target_square = 0.0
        try:
            for index, mask in enumerate(masks):
                inputs.clear()
                with torch.no_grad():
                    run_student(index)
                x, weight = rows(inputs[0], mask)
                y = block_targets[index].double()
                if bias:
                    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
                if weight is not None:
                    x, y = x * weight, y * weight
                gram += x.T @ x
                cross += x.T @ y
                target_square += float((y**2).sum())
        finally:
            hook.remove()
        scale = float(torch.diagonal(gram).mean()) or 1.0
        solution = torch.linalg.solve(gram + ridge * scale * torch.eye(width, dtype=torch.float64), cross)
        residual = float(target_square - 2 * (solution * cross).sum() + (solution * (gram @ solution)).sum())
        errors.append(max(0.0, residual) / max(target_square, 1e-12))
        with torch.no_grad():
            student_down.weight.copy_(solution[: student_down.in_features].T.to(student_down.weight.dtype))
            if bias:
                student_down.bias.copy_(solution[-1].to(student_down.bias.dtype))
    return errors
