"""What `vlmopt serve` runs: the artifacts chosen for each tower (or the generative artifact), loaded once, with the
checkpoint's own processors. No HTTP here: `vlmopt.serving.app` puts these behind the endpoints.

Encoders serve bench's recommendation per tower by default (at the largest benched batch within `--max-batch`), so
a server runs what `vlmopt bench` measured and verified on this machine; generative models serve what `vlmopt
generate` would (onnx, else hf).
"""

from __future__ import annotations

import io
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlmopt.errors import VlmoptError
from vlmopt.workspace import Artifact, ModelDir

log = logging.getLogger("vlmopt")

#: the towers a server answers with, by the role of their first input
IMAGE_ROLES = ("image",)
TEXT_ROLES = ("input_ids",)


class BadItem(ValueError):
    """One item of a request that cannot be served (not an image, too large, empty text): a 4xx, by kind."""

    def __init__(self, kind: str, message: str, status: int = 400):
        super().__init__(message)
        self.kind, self.message, self.status = kind, message, status


@dataclass
class ServedTower:
    """One tower behind the server: which artifact runs it and why that one."""

    tower: str
    artifact: str
    backend: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"tower": self.tower, "artifact": self.artifact, "backend": self.backend, "reason": self.reason}


def _family(model_dir: ModelDir, artifact: Artifact) -> Any:
    from vlmopt.families import family_for, family_named
    from vlmopt.hf import load_config

    return family_named(artifact.traits.family) or family_for(load_config(model_dir.checkpoint_folder(artifact)))


def open_service(directory: str | os.PathLike[str], artifact: str = "", max_batch: int = 8, backend: str = "auto", threads: int | None = None) -> Any:
    """The service of the model directory: an `EncoderService` or a `ChatService`. Refuses (VlmoptError) a directory
    with nothing servable before loading any model."""
    model_dir = ModelDir.open(directory)
    known = model_dir.load()
    if not known:
        raise VlmoptError(f"{model_dir.path} has no artifacts to serve; make some with `vlmopt export` and `vlmopt convert`")
    first = known[artifact] if artifact in known else next(iter(known.values()))
    if _family(model_dir, first).generative:
        return ChatService(model_dir, artifact, backend, threads)
    if backend != "auto":
        raise VlmoptError(f"--backend {backend} is for generative models; {model_dir.path} holds an encoder")
    return EncoderService(model_dir, choose_towers(model_dir, artifact, max_batch), threads)


def choose_towers(model_dir: ModelDir, requested: str, max_batch: int) -> dict[str, ServedTower]:
    """Per servable tower, the artifact to run: the one named, else bench's recommendation."""
    from vlmopt.runners import BACKENDS

    if requested:
        artifact = model_dir.artifact(requested)
        if artifact.kind not in BACKENDS:
            raise VlmoptError(f"'{requested}' is a {artifact.kind} artifact, which vlmopt cannot run; serve one of kind {', '.join(BACKENDS)}")
        towers = _servable_towers(model_dir, artifact)
        if not towers:
            raise VlmoptError(f"'{requested}' has no image or text tower to serve")
        return {t: ServedTower(t, artifact.name, BACKENDS[artifact.kind], "named on the command line") for t in towers}
    recommendation = model_dir.recommendation()
    if recommendation is None:
        raise VlmoptError(
            f"{model_dir.path} has no bench recommendation to serve: run `vlmopt bench {model_dir.path}` first, or name the artifact "
            f"(`vlmopt serve {model_dir.path} onnx`)"
        )
    served: dict[str, ServedTower] = {}
    unmet = []
    for tower in dict.fromkeys(c.tower for c in recommendation.choices):
        choices = [c for c in recommendation.choices if c.tower == tower]
        within = [c for c in choices if c.batch <= max_batch]
        choice = max(within, key=lambda c: c.batch) if within else min(choices, key=lambda c: c.batch)
        if choice.artifact is None:
            unmet.append(f"{tower} (batch {choice.batch})")
            continue
        artifact = model_dir.artifact(choice.artifact)
        if tower not in _servable_towers(model_dir, artifact):
            continue
        if artifact.digest != choice.digest:
            log.warning(f"'{artifact.name}' was re-made after bench measured it: serving it anyway; run `vlmopt bench {model_dir.path}` again")
        reason = f"bench's recommendation at batch {choice.batch} ({recommendation.report}: {choice.latency_ms:.2f} ms, {choice.speedup:.2f}x PyTorch, {choice.gate})"
        served[tower] = ServedTower(tower, artifact.name, choice.backend or BACKENDS[artifact.kind], reason)
    if not served:
        detail = f": no artifact passed its fidelity gate for {', '.join(unmet)}" if unmet else ""
        raise VlmoptError(f"bench's recommendation in {model_dir.path} names no servable image or text tower{detail}; name the artifact to serve")
    return served


def _servable_towers(model_dir: ModelDir, artifact: Artifact) -> list[str]:
    from vlmopt.runners import ArtifactRunners

    with ArtifactRunners(model_dir.artifact_path(artifact.name), artifact) as runners:
        towers = runners.towers()
    return [name for name, tower in towers.items() if _role(tower) is not None]


def _role(tower: Any) -> str | None:
    roles = {spec.role for spec in tower.inputs}
    if roles & set(IMAGE_ROLES) and not roles & set(TEXT_ROLES):
        return "image"
    if roles & set(TEXT_ROLES) and not roles & set(IMAGE_ROLES):
        return "text"
    return None


def decode_image(data: bytes, max_pixels: int) -> Any:
    """An encoded image as RGB; its size is read from the header and checked before anything is decoded, so a
    decompression bomb costs nothing. Not an image, a truncated or corrupt one: BadItem."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise BadItem("image_too_large", f"the image is {width}x{height} = {width * height} pixels; this server takes at most {max_pixels}", 413)
            return image.convert("RGB")
    except BadItem:
        raise
    except Image.DecompressionBombError as exc:
        raise BadItem("image_too_large", f"the image is too large to decode ({exc})", 413) from None
    except UnidentifiedImageError:
        raise BadItem("bad_image", "the data is not an image this server can decode (PNG, JPEG, WebP, GIF, BMP, TIFF)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadItem("bad_image", f"the image cannot be decoded: {(str(exc).splitlines() or [''])[0][:200]}") from None


class EncoderService:
    """The image and text towers of an encoder model, each run by its chosen artifact, with the saved image
    processor and tokenizer. `embed_images`/`embed_texts` take a batch and are what the batcher calls."""

    generative = False

    def __init__(self, model_dir: ModelDir, served: dict[str, ServedTower], threads: int | None = None):
        from vlmopt.calibration import saved_processors
        from vlmopt.runners import ArtifactRunners

        self.model_dir = model_dir
        self.served = served
        self._artifact_runners: list[Any] = []
        self.runners: dict[str, Any] = {}
        self.towers: dict[str, Any] = {}
        artifacts = {s.artifact: model_dir.artifact(s.artifact) for s in served.values()}
        first = artifacts[next(iter(served.values())).artifact]
        self.family = _family(model_dir, first)
        self.checkpoint = model_dir.checkpoint_folder(first)
        self.tokenizer, self.image_processor = saved_processors(self.checkpoint)
        for name, artifact in artifacts.items():
            # threads that spin after a batch would take the cores from the decoding, preprocessing and HTTP work
            # between batches (measured: `make bench-serve`)
            runners = ArtifactRunners(model_dir.artifact_path(name), artifact, threads=threads, spinning=False)
            self._artifact_runners.append(runners)
            towers = runners.towers()
            for tower_name, choice in served.items():
                if choice.artifact == name:
                    tower = towers[tower_name]
                    fixed = tower.inputs[0].shape[0]
                    if isinstance(fixed, int):
                        raise VlmoptError(f"'{name}' has a fixed batch of {fixed} (a static export); serve an artifact with a dynamic batch axis")
                    self.towers[tower_name] = tower
                    self.runners[tower_name] = runners.runner(tower)
        self.image_tower = next((t for t in self.towers if _role(self.towers[t]) == "image"), None)
        self.text_tower = next((t for t in self.towers if _role(self.towers[t]) == "text"), None)
        if self.image_tower and self.image_processor is None:
            raise VlmoptError(f"{self.checkpoint} has no saved image processor: the server cannot turn images into pixels")
        if self.text_tower and self.tokenizer is None:
            raise VlmoptError(f"{self.checkpoint} has no saved tokenizer: the server cannot turn text into tokens")
        self.zero_shot = self.family.zero_shot if self.image_tower and self.text_tower else None
        self.logit_scale, self.logit_bias = (_checkpoint_scalar(self.checkpoint, "logit_scale"), _checkpoint_scalar(self.checkpoint, "logit_bias"))
        #: dual encoders answer with unit-length embeddings, as their zero-shot scores use them
        self.normalize = self.family.zero_shot is not None
        #: hears (tower, stage, seconds) of each batch: "preprocess" (image processor or tokenizer) and "model"
        self.observe: Callable[[str, str, float], None] = lambda tower, stage, seconds: None

    def describe(self) -> dict[str, Any]:
        return {"kind": "encoder", "family": self.family.name, "towers": {t: s.to_json() for t, s in self.served.items() if t in self.towers}}

    def close(self) -> None:
        for runner in self.runners.values():
            runner.close()
        for runners in self._artifact_runners:
            runners.close()

    # -- per item, in the request's own thread ------------------------------------------------------
    def image(self, data: bytes, max_pixels: int) -> np.ndarray:
        """One encoded image, checked, decoded (BadItem where it cannot be) and run through the saved image processor:
        the pixel values `embed_images` stacks. Done per request, in the request's thread, so it overlaps the model
        running the batch before (in the batcher's thread it cost 25 of every 176 ms at batch 8, `make bench-serve`)."""
        image = decode_image(data, max_pixels)
        started = time.perf_counter()
        pixels = np.asarray(self.image_processor(images=[image], return_tensors="np")["pixel_values"][0], dtype=np.float32)
        self.observe(self.image_tower, "preprocess", time.perf_counter() - started)
        return pixels

    # -- per batch, in the batcher's thread ---------------------------------------------------------
    def embed_images(self, images: list[np.ndarray]) -> list[list[float]]:
        """Preprocessed images (`image`) -> embeddings: one model call over the stacked batch."""
        started = time.perf_counter()
        tower = self.towers[self.image_tower]
        output = self.runners[self.image_tower].run({tower.inputs[0].name: np.stack(images)})[tower.outputs[0].name]
        self.observe(self.image_tower, "model", time.perf_counter() - started)
        return self._rows(output)

    def embed_texts(self, texts: list[str]) -> list[list[float]]:
        from vlmopt.calibration import encode_text, text_padding

        tower = self.towers[self.text_tower]
        fixed = tower.inputs[0].shape[1] if len(tower.inputs[0].shape) > 1 and isinstance(tower.inputs[0].shape[1], int) else None
        padding: bool | str = "max_length" if fixed else text_padding(tower)
        started = time.perf_counter()
        feed = encode_text(texts, self.tokenizer, self.checkpoint, tower, "the request", padding, fixed)
        tokenized = time.perf_counter()
        output = self.runners[self.text_tower].run(feed)[tower.outputs[0].name]
        self.observe(self.text_tower, "preprocess", tokenized - started)
        self.observe(self.text_tower, "model", time.perf_counter() - tokenized)
        return self._rows(output)

    def _rows(self, output: Any) -> list[list[float]]:
        rows = np.asarray(output, dtype=np.float32).reshape(len(output), -1)
        if self.normalize:
            rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
        return rows.tolist()

    def scores(self, image_embeddings: list[list[float]], text_embeddings: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
        """(cosine similarities, zero-shot scores) of every image against every label: the family's activation over
        the similarities scaled by the checkpoint's exp(logit_scale) (plus its logit_bias)."""
        images = np.asarray(image_embeddings, dtype=np.float64)
        labels = np.asarray(text_embeddings, dtype=np.float64)
        cosine = images @ labels.T
        logits = cosine * math.exp(self.logit_scale if self.logit_scale is not None else 0.0) + (self.logit_bias or 0.0)
        if self.zero_shot == "sigmoid":
            return cosine, 1.0 / (1.0 + np.exp(-logits))
        logits -= logits.max(axis=1, keepdims=True)
        probabilities = np.exp(logits)
        return cosine, probabilities / probabilities.sum(axis=1, keepdims=True)


def _checkpoint_scalar(folder: Path, name: str) -> float | None:
    """A scalar parameter (`logit_scale`) read from the checkpoint's safetensors without loading the model."""
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="np") as weights:
            if name in weights.keys():  # noqa: SIM118 - safe_open has keys(), not __contains__
                return float(np.asarray(weights.get_tensor(name), dtype=np.float64).reshape(-1)[0])
    return None


class ChatService:
    """A generative artifact behind `/v1/chat/completions`: vlmopt's `Generator`, the entry point of `vlmopt generate`."""

    generative = True

    def __init__(self, model_dir: ModelDir, artifact: str, backend: str, threads: int | None):
        from vlmopt.generation import Generator

        self.generator = Generator(model_dir.path, artifact, backend, threads)
        self.family = _family(model_dir, self.generator.artifact)
        self.image_token = self.generator.preprocessor.image_token

    def load(self) -> None:
        self.generator.load()

    def describe(self) -> dict[str, Any]:
        return {"kind": "generative", "family": self.family.name, "artifact": self.generator.artifact.name, "backend": self.generator.backend}

    def close(self) -> None:
        self.generator.close()
