"""`vlmopt generate DIR [ARTIFACT] --image PATH --prompt TEXT`: text from images and a prompt, from any generative artifact.

It reads the model directory (no lock: it writes nothing). The prompt is prepared once by the model's own
processor (chat template, `<image>` expanded to the image's tokens, pixels) before any backend runs, so
transformers, vlmopt's ONNX Runtime loop and onnxruntime-genai all see identical ids. Every bad input is
refused before a model is loaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmopt.errors import VlmoptError
from vlmopt.options import StageOptions, option
from vlmopt.workspace import Artifact, ModelDir

BACKENDS = ("auto", "transformers", "onnxruntime", "onnxruntime-genai", "openvino")
#: the backends each artifact kind can run on; the first is the default
KIND_BACKENDS = {"hf": ("transformers",), "onnx": ("onnxruntime", "onnxruntime-genai"), "openvino": ("openvino",)}


@dataclass
class GenerateOptions(StageOptions):
    artifact: str = option(
        "", "The artifact to generate with: hf (transformers) or an ONNX variant (default: onnx if there is one, else hf).", argument=True, metavar="[ARTIFACT]"
    )
    image: list[str] = option([], "An image file; repeat for several, in the order the prompt refers to them.", metavar="PATH", separator=None)
    prompt: str | None = option(None, "The user's message; the model's chat template wraps it (images first unless the prompt marks them with <image>).")
    max_new_tokens: int = option(64, "Most new tokens to generate.", minimum=1)
    temperature: float = option(0.0, "0: greedy (the default); above 0: sample at this temperature.", minimum=0.0)
    top_p: float = option(1.0, "Sampling: keep the smallest set of tokens whose probability reaches this.", minimum=0.0, maximum=1.0, exclusive=("min",))
    seed: int = option(0, "Sampling: the random seed.", minimum=0)
    raw_prompt: bool = option(False, "Give --prompt to the model as is (no chat template); it must hold one <image> per --image.")
    backend: str = option(
        "auto",
        "transformers (hf), onnxruntime (vlmopt's loop), onnxruntime-genai or openvino (vlmopt's loop on OpenVINO IR); auto: the artifact's first.",
        choices=BACKENDS,
    )

    def check(self) -> None:
        if self.prompt is None:
            raise VlmoptError("generate needs --prompt TEXT")
        if self.top_p < 1.0 and self.temperature == 0:
            raise VlmoptError("--top-p applies to sampling; add --temperature above 0")


def _family(model_dir: ModelDir, artifact: Artifact) -> Any:
    from vlmopt.families import all_families, family_for, generative_families
    from vlmopt.hf import load_config

    family = next((f for f in all_families() if f.name == artifact.traits.family), None)
    if family is None:
        family = family_for(load_config(model_dir.checkpoint_folder(artifact)))
    if not family.generative:
        raise VlmoptError(
            f"'{artifact.name}' is a {family.name} model, an encoder: it has no text generation (generative families: {', '.join(generative_families())})"
        )
    return family


def load_images(paths: list[str]) -> tuple[list[Any], list[str]]:
    """The images as 8-bit RGB (`vlmopt.calibration.read_image`: over Pillow's pixel limit or unreadable: refused), and
    a note per image converted from another mode (grayscale, CMYK, 16-bit, ...)."""
    from vlmopt.calibration import read_image

    images, conversions = [], []
    for path in paths:
        if not Path(path).is_file():
            raise VlmoptError(f"image {path} does not exist")
        image, converted = read_image(Path(path), "the")
        images.append(image)
        if converted:
            conversions.append(f"{path}: {converted}")
    return images, conversions


def _backend(artifact: Artifact, requested: str) -> str:
    choices = KIND_BACKENDS.get(artifact.kind)
    if choices is None:
        raise VlmoptError(f"'{artifact.name}' is {artifact.kind} artifact; generate runs hf, ONNX and OpenVINO artifacts")
    if requested == "auto":
        return choices[0]
    if requested not in choices:
        raise VlmoptError(f"'{artifact.name}' ({artifact.kind}) runs on {' or '.join(choices)}, not --backend {requested}")
    return requested


def open_runner(model_dir: ModelDir, artifact: Artifact, backend: str, preprocessor: Any, threads: int | None) -> Any:
    """The generate runner of `artifact` on `backend` (transformers, onnxruntime or onnxruntime-genai)."""
    folder = model_dir.artifact_path(artifact.name)
    if backend == "transformers":
        from vlmopt.runners.generate import HfGenerateRunner

        return HfGenerateRunner(folder, threads, family=preprocessor.family)
    if backend == "onnxruntime-genai":
        from vlmopt.runners.genai import GenaiGenerateRunner

        if preprocessor.contract.genai_model_type is None:
            raise VlmoptError(f"onnxruntime-genai has no model type that runs {preprocessor.family.name} models; use --backend onnxruntime (vlmopt's loop)")

        return GenaiGenerateRunner(folder, preprocessor.image_token_id, threads)
    from vlmopt.runners.generate import loop_files
    from vlmopt.runners.loops import loop_runner

    files = loop_files(artifact.towers, preprocessor.contract)
    engines = {name: record.engine for name, record in artifact.towers.items()}
    return loop_runner(folder, files, threads, preprocessor.contract, engines)


class StopGeneration(Exception):
    """Raised by an `on_text` listener to end a generation early (a stop string seen): the text so far is the result."""


class Generator:
    """A generative artifact opened once (its processor and a backend runner) for many generations.

    `vlmopt generate` makes one for a single call; `vlmopt serve` keeps one for its lifetime. A context manager
    that releases the runner."""

    def __init__(self, directory: str | os.PathLike[str], artifact: str = "", backend: str = "auto", threads: int | None = None):
        model_dir = ModelDir.open(directory)
        name = artifact or ("onnx" if "onnx" in model_dir.load() else "hf")
        self.artifact = model_dir.artifact(name)
        family = _family(model_dir, self.artifact)
        self.backend = _backend(self.artifact, backend)
        # the checkpoint's own processor: the copy convert writes beside the parts is for runtimes without a model directory
        self.preprocessor = family.preprocessor(model_dir.checkpoint_folder(self.artifact))
        self._open = lambda: open_runner(model_dir, self.artifact, self.backend, self.preprocessor, threads)
        self.runner: Any = None

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def load(self) -> Generator:
        """Load the backend now (otherwise the first generation does)."""
        if self.runner is None:
            self.runner = self._open()
        return self

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
            self.runner = None

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        """A conversation (`role`, and `content` as text or a list of {"type": "text"|"image"} parts) through the
        model's chat template, ending with the assistant's turn; image parts become the model's image marker."""
        processor = self.preprocessor.processor
        if not self.preprocessor.has_chat_template:
            raise VlmoptError("this model has no chat template; it cannot take a conversation")
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def prompt(self, text: str, images: list[Any], chat: bool = True, max_new_tokens: int = 1) -> Any:
        """The prepared prompt; refused when it and `max_new_tokens` do not fit the model's positions."""
        prompt = self.preprocessor(text, images, chat=chat)
        length = int(prompt.input_ids.shape[1])
        limit = self.preprocessor.max_positions
        if length >= limit:
            marked = " with its image tokens" if getattr(self.preprocessor, "image_token", "") and images else ""
            raise VlmoptError(f"the prompt ({length} tokens{marked}) exceeds the model's {limit} positions; shorten it")
        if length + max_new_tokens > limit:
            raise VlmoptError(
                f"the prompt ({length} tokens) plus {max_new_tokens} new tokens exceeds the model's {limit} positions; "
                f"ask for at most {max(limit - length, 0)} new tokens"
            )
        return prompt

    def generate(self, prompt: Any, max_new_tokens: int, sampling: Any, on_text: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Generate from a prepared prompt (batch of one); `on_text` hears the text as it grows and may raise
        StopGeneration to end it there (finish reason "stop")."""
        import time

        from vlmopt.runners.generate import GenerateRequest

        request = GenerateRequest(prompt, max_new_tokens, self.preprocessor.eos_token_ids, self.preprocessor.pad_token_id, sampling)
        streamed: list[int] = []
        shown = [""]
        started = time.perf_counter()
        stamps: list[float] = []

        def on_token(tokens: Any) -> None:
            if not len(tokens):
                return
            stamps.append(time.perf_counter())
            streamed.append(int(tokens[0]))
            if on_text is None:
                return
            text = self.preprocessor.decode(streamed)
            if text.startswith(shown[0]) and not text.endswith("\ufffd"):  # a partial character waits for its next byte
                on_text(text[len(shown[0]) :])
                shown[0] = text

        self.load()
        try:
            result = self.runner.generate(request, on_token)
        except StopGeneration:
            first, last = stamps[0], stamps[-1]
            tokens, finish = streamed, "stop"
            timings = {
                "image_encode_s": None,
                "ttft_s": first - started,
                "decode_tokens_per_s": (len(stamps) - 1) / (last - first) if len(stamps) > 1 and last > first else None,
                "total_s": last - started,
            }
        else:
            tokens, finish, timings = result.tokens[0], result.finish_reasons[0], result.to_json()["timings"]
            text = self.preprocessor.decode(tokens)
            if on_text is not None and text.startswith(shown[0]) and text != shown[0]:
                on_text(text[len(shown[0]) :])
        return {
            "artifact": self.artifact.name,
            "backend": self.backend,
            "prompt_tokens": int(prompt.input_ids.shape[1]),
            "images": prompt.num_images,
            "sampling": request.sampling.to_json(),
            "tokens": tokens,
            "text": self.preprocessor.decode(tokens) if finish != "stop" else shown[0],
            "finish_reason": finish,
            "timings": timings,
        }


def generate(
    directory: str | os.PathLike[str], options: GenerateOptions, threads: int | None = None, on_text: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Generate from the images and prompt in `options`; `on_text` hears the text as it grows (batch of one).

    Returns the artifact, backend, prompt length, new tokens, text, why it stopped and the timings. Raises
    VlmoptError (exit 2) for bad input before any model is loaded."""
    from vlmopt.runners.generate import Sampling

    options.validate()
    with Generator(directory, options.artifact, options.backend, threads) as generator:
        images, conversions = load_images(options.image)
        prompt = generator.prompt(options.prompt or "", images, chat=not options.raw_prompt, max_new_tokens=options.max_new_tokens)
        result = generator.generate(prompt, options.max_new_tokens, Sampling(options.temperature, options.top_p, options.seed), on_text)
    return {**result, "image_conversions": conversions}
