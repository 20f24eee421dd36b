"""Text generation behind one interface: transformers' `generate`, vlmopt's own loop over ONNX Runtime sessions,
and onnxruntime-genai (`vlmopt.runners.genai`).

Every backend takes the same `GenerateRequest`, made once by the family's preprocessor (chat template,
image tokens expanded, pixels), so all of them see identical ids. `generate` checks the request and
keeps the timings; a backend writes only `generate_impl`, as tower runners write `run_impl`.

The ONNX Runtime loop runs the parts of the family's generative contract
(`vlmopt.families.generative.GenerativeContract`: vision -> image_features where the family takes images,
embedding -> inputs_embeds, decoder with a KV cache), by the names the contract gives them; transformers' reference reads its Hugging Face paths from the family. It keeps the cache in ONNX Runtime's memory with IO binding
(`KvCache`), in the decoder's own contract:
  * concat (a decoder exported from PyTorch): each step's `present` outputs are bound as the next step's
    `past` inputs, with no copy through numpy (the graph's Concat still copies inside); left padding;
  * shared (GroupQueryAttention, onnxruntime-genai's builder): one buffer per layer, as long as the whole
    generation, bound as both past and present and updated in place by the operator. The operator places
    each row's new positions after that row's own length (the count of ones in its mask), so a batch is
    right-padded: prompts are moved to the left edge and the mask is "the first n positions" per row. With a
    left-padded batch it silently computes wrong logits (measured: 0.59 max |diff| on the tiny demo), and it
    refuses more than one new position on a past beyond batch 1.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlmopt.errors import VlmoptError
from vlmopt.families.generative import (
    ATTENTION_MASK,
    IMAGE_FEATURES,
    INPUT_IDS,
    INPUTS_EMBEDS,
    LOGITS,
    PIXEL_VALUES,
    POSITION_IDS,
    POSITIONS_1D,
    POSITIONS_MROPE,
    SELF_ATTENTION,
    GenerativeContract,
    Prompt,
)
from vlmopt.graph import LOGITS_TO_KEEP
from vlmopt.inputs import position_ids
from vlmopt.runners.ort_runner import quiet_cpu_options

#: called after each step with the new token of every sequence
OnToken = Callable[[np.ndarray], None]


@dataclass
class Sampling:
    """Greedy at temperature 0 (the default); otherwise temperature, then nucleus (top-p) sampling, seeded."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def to_json(self) -> dict[str, Any]:
        return {"greedy": self.greedy, "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed}


class TokenPicker:
    """Picks the next token of each sequence from its logits, with the sampling settings and a seeded generator."""

    def __init__(self, sampling: Sampling):
        self.sampling = sampling
        self.rng = np.random.default_rng(sampling.seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        if self.sampling.greedy:
            return logits.argmax(-1).astype(np.int64)
        scaled = logits.astype(np.float64) / self.sampling.temperature
        scaled -= scaled.max(-1, keepdims=True)
        probs = np.exp(scaled)
        probs /= probs.sum(-1, keepdims=True)
        picked = np.empty(len(probs), dtype=np.int64)
        for row, p in enumerate(probs):
            order = np.argsort(-p, kind="stable")
            keep = order[: int(np.searchsorted(np.cumsum(p[order]), self.sampling.top_p) + 1)]
            picked[row] = keep[self.rng.choice(len(keep), p=p[keep] / p[keep].sum())]
        return picked


@dataclass
class GenerateRequest:
    """What to generate from: the preprocessed prompt, how many new tokens, how to pick them, when to stop.

    `min_new_tokens` keeps end-of-sequence tokens from being picked before that many (as transformers'
    option of that name does): verification and benchmarks compare fixed-length generations."""

    prompt: Prompt
    max_new_tokens: int
    eos_token_ids: list[int]
    pad_token_id: int
    sampling: Sampling = field(default_factory=Sampling)
    min_new_tokens: int = 0

    @property
    def batch(self) -> int:
        return int(self.prompt.input_ids.shape[0])


@dataclass
class GenerateResult:
    """New tokens per sequence (end-of-sequence included when picked), why each stopped, and the timings.

    `ttft_s`: from the call to the first new token (image encoding, embedding and prefill included);
    `decode_tokens_per_s`: per sequence, over the steps after the first ((N-1) / (t_last - t_first))."""

    tokens: list[list[int]]
    finish_reasons: list[str]
    ttft_s: float
    total_s: float
    decode_tokens_per_s: float | None
    image_encode_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "finish_reasons": self.finish_reasons,
            "timings": {
                "image_encode_s": self.image_encode_s,
                "ttft_s": self.ttft_s,
                "decode_tokens_per_s": self.decode_tokens_per_s,
                "total_s": self.total_s,
            },
        }


class Steps:
    """The bookkeeping every loop shares: tokens per sequence, who has stopped, timestamps."""

    def __init__(self, request: GenerateRequest, on_token: OnToken | None):
        self.request = request
        self.on_token = on_token
        self.started = time.perf_counter()
        self.stamps: list[float] = []
        self.tokens: list[list[int]] = [[] for _ in range(request.batch)]
        self.done = np.zeros(request.batch, dtype=bool)
        self.image_encode_s: float | None = None

    def suppress(self, logits: np.ndarray) -> np.ndarray:
        """No end-of-sequence before `min_new_tokens`."""
        if len(self.stamps) < self.request.min_new_tokens and self.request.eos_token_ids:
            logits = logits.copy()
            logits[:, self.request.eos_token_ids] = -np.inf
        return logits

    def add(self, picked: np.ndarray) -> np.ndarray:
        """Record one step's tokens (finished sequences get padding); return the tokens to feed next."""
        picked = np.where(self.done, self.request.pad_token_id, picked).astype(np.int64)
        self.stamps.append(time.perf_counter())
        for row, token in enumerate(picked):
            if not self.done[row]:
                self.tokens[row].append(int(token))
                if int(token) in self.request.eos_token_ids:
                    self.done[row] = True
        if self.on_token is not None:
            self.on_token(picked)
        return picked

    @property
    def finished(self) -> bool:
        return bool(self.done.all()) or len(self.stamps) >= self.request.max_new_tokens

    def result(self) -> GenerateResult:
        first, last = self.stamps[0], self.stamps[-1]
        steps = len(self.stamps)
        return GenerateResult(
            tokens=self.tokens,
            finish_reasons=["eos" if done else "length" for done in self.done],
            ttft_s=first - self.started,
            total_s=last - self.started,
            decode_tokens_per_s=(steps - 1) / (last - first) if steps > 1 and last > first else None,
            image_encode_s=self.image_encode_s,
        )


class GenerateRunner(ABC):
    """One backend that generates; a context manager that releases its model or sessions."""

    backend: str = ""
    #: the largest batch it generates at once (onnxruntime-genai's multimodal pipeline: 1)
    max_batch: int | None = None

    def generate(self, request: GenerateRequest, on_token: OnToken | None = None) -> GenerateResult:
        if request.max_new_tokens < 1:
            raise VlmoptError(f"max_new_tokens must be at least 1, got {request.max_new_tokens}")
        if self.max_batch is not None and request.batch > self.max_batch:
            raise VlmoptError(f"the {self.backend} backend generates {self.max_batch} sequence(s) at a time, not {request.batch}")
        return self.generate_impl(request, on_token)

    @abstractmethod
    def generate_impl(self, request: GenerateRequest, on_token: OnToken | None) -> GenerateResult: ...

    def encode_images(
        self, pixel_values: np.ndarray, vision_inputs: dict[str, np.ndarray] | None = None, reference_inputs: dict[str, np.ndarray] | None = None
    ) -> np.ndarray | None:
        """The image features alone (the benchmark's image-encode latency); None where the backend cannot run them alone.
        `vision_inputs`/`reference_inputs`: as the prompt holds them (`Prompt`); only the reference reads the latter."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the runner holds."""

    def __enter__(self) -> GenerateRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- transformers ---------------------------------------------------------------------------------
class HfGenerateRunner(GenerateRunner):
    """transformers' own `generate` with its KV cache (the reference), SDPA attention unless told otherwise."""

    backend = "transformers"

    def __init__(self, folder: Path | None = None, threads: int | None = None, attn_implementation: str = "sdpa", model: Any = None, family: Any = None):
        import torch

        from vlmopt.families import family_for
        from vlmopt.hf import load_model

        if threads:
            torch.set_num_threads(threads)
        self.model = model if model is not None else load_model(Path(folder or "."), attn_implementation=attn_implementation)
        self.family = family if family is not None else family_for(self.model.config)

    def encode_images(
        self, pixel_values: np.ndarray, vision_inputs: dict[str, np.ndarray] | None = None, reference_inputs: dict[str, np.ndarray] | None = None
    ) -> np.ndarray:
        import torch

        vision, reference = ({name: torch.from_numpy(value) for name, value in (found or {}).items()} for found in (vision_inputs, reference_inputs))
        with torch.inference_mode():
            return self.family.image_features(self.model, torch.from_numpy(pixel_values), vision, reference).numpy()

    def generate_impl(self, request: GenerateRequest, on_token: OnToken | None) -> GenerateResult:
        import torch
        from transformers.generation.streamers import BaseStreamer

        steps = Steps(request, on_token)

        class Stream(BaseStreamer):
            """transformers hands the prompt first, then each step's tokens."""

            prompt_seen = False

            def put(self, value: Any) -> None:
                if not self.prompt_seen:
                    self.prompt_seen = True
                    return
                steps.add(value.reshape(-1).numpy())

            def end(self) -> None:
                return None

        prompt = request.prompt
        kwargs: dict[str, Any] = {
            "input_ids": torch.from_numpy(prompt.input_ids),
            "attention_mask": torch.from_numpy(prompt.attention_mask),
            "max_new_tokens": request.max_new_tokens,
            "min_new_tokens": request.min_new_tokens,
            "eos_token_id": request.eos_token_ids or None,
            "pad_token_id": request.pad_token_id,
            "streamer": Stream(),
        }
        if prompt.pixel_values is not None:
            extra = {name: torch.from_numpy(value) for name, value in prompt.vision_inputs.items()}
            kwargs.update(self.family.generate_inputs(torch.from_numpy(prompt.pixel_values), extra))
        kwargs.update({name: torch.from_numpy(value) for name, value in prompt.decoder_inputs.items()})
        kwargs.update({name: torch.from_numpy(value) for name, value in prompt.reference_inputs.items()})
        if request.sampling.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            torch.manual_seed(request.sampling.seed)
            kwargs.update(do_sample=True, temperature=request.sampling.temperature, top_p=request.sampling.top_p, top_k=0)
        with torch.inference_mode():
            self.family.reference_generate(self.model, kwargs)
        return steps.result()

    def close(self) -> None:
        self.model = None


# -- ONNX Runtime ---------------------------------------------------------------------------------
def ort_session(path: Path, threads: int | None, plain_inputs: tuple[str, ...] = ()) -> Any:
    """A CPU session that does not spin between runs: on shared cores, spinning threads slow whatever runs next.

    `plain_inputs`: inputs the graph gives a default (an initializer of the same name) that the session takes as plain
    inputs, without the default. ONNX Runtime lists an input with a default among `get_overridable_initializers()`,
    not `get_inputs()`, and IO binding binds none of those ("Failed to find NodeArg"); the file is not changed (the
    graph is read without its external data, which the session reads from the file's folder)."""
    import onnxruntime as ort

    options = quiet_cpu_options(threads)
    source: str | bytes = str(path)
    try:
        if plain_inputs:
            import onnx

            model = onnx.load(str(path), load_external_data=False)
            kept = [t for t in model.graph.initializer if t.name not in plain_inputs]
            if len(kept) < len(model.graph.initializer):
                del model.graph.initializer[:]
                model.graph.initializer.extend(kept)
                source = model.SerializeToString()
                options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(Path(path).parent))
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise VlmoptError(f"cannot load ONNX file {path}: {first}") from exc


class OrtParts:
    """The vision, embedding and decoder sessions of one artifact (named by the family's `contract`), and what each step needs from them.

    A `<decoder>_prefill` file among `files` is a second decoder for the prompt (same inputs, outputs and cache
    layout, other weights: int8 or fp32 beside an int4 decode decoder, whose low-bit MatMuls are slow at prompt
    lengths); the prompt runs through it and every decode step through the decoder."""

    def __init__(self, folder: Path, files: dict[str, str], threads: int | None = None, contract: GenerativeContract | None = None):
        contract = contract or GenerativeContract()
        if contract.positions not in (POSITIONS_1D, POSITIONS_MROPE) or contract.cache != SELF_ATTENTION:
            raise VlmoptError(
                f"vlmopt's ONNX Runtime loop runs 1-D positions and a self-attention cache, not {contract.positions} positions "
                f"with a {contract.cache} cache; generate with --backend transformers"
            )
        self.contract = contract
        vision = contract.vision.name if contract.vision is not None else None
        embedding, decoder = contract.embedding.name, contract.decoder.name
        missing = [part for part in (embedding, decoder) if part not in files]
        if missing:
            raise VlmoptError(f"{folder} has no {' and no '.join(missing)} part; generation needs {embedding} and {decoder} parts")
        self.vision = self.session(folder / files[vision], threads) if vision in files else None
        self.embedding = self.session(folder / files[embedding], threads)
        #: a bare language model's embedding part takes the token ids alone
        self.embedding_takes_images = IMAGE_FEATURES in {i.name for i in self.embedding.get_inputs()}
        self.decoder = self.decoder_session(folder / files[decoder], threads)
        prefill = prefill_part(contract)
        self.prefill = self.decoder_session(folder / files[prefill], threads) if prefill in files else None
        if self.prefill is not None and _signature(self.prefill) != _signature(self.decoder):
            raise VlmoptError(
                f"{files[prefill]} does not take and give what {files[decoder]} does; a prefill decoder must share its decoder's inputs, outputs and cache"
            )
        inputs = {i.name: i for i in self.decoder.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.present_names = [o.name for o in self.decoder.get_outputs() if o.name.startswith("present.")]
        if not self.past_names or len(self.past_names) != len(self.present_names):
            raise VlmoptError(f"{files[decoder]} is not a decoder with a KV cache (past_key_values.* -> present.*)")
        self.takes_positions = POSITION_IDS in inputs
        #: M-RoPE decoders take position_ids [3, batch, sequence]: the prompt's from the preprocessor, text positions elsewhere
        shape = inputs[POSITION_IDS].shape if self.takes_positions else ()
        self.position_axes = int(shape[0]) if len(shape) == 3 else 0
        if (contract.positions == POSITIONS_MROPE) != (self.position_axes > 0):
            raise VlmoptError(
                f"the contract declares {contract.positions} positions but {files[decoder]} takes "
                f"{f'{len(shape)}-D' if self.takes_positions else 'no'} position_ids; re-make it with `vlmopt convert`"
            )
        #: the contract's per-position decoder inputs this graph takes: the prompt's values at prefill, 0 afterwards
        self.position_inputs = [name for name in contract.decoder_inputs if name in inputs]
        #: convert gives the decoder `logits_to_keep` (a prefill computes its last position's logits only)
        self.keeps_logits = LOGITS_TO_KEEP in inputs
        #: GroupQueryAttention decoders (onnxruntime-genai's builder) take no positions (rotary inside the operator)
        #: and update one shared past/present buffer in place
        self.shares_buffer = not self.takes_positions
        past = inputs[self.past_names[0]].shape
        if not isinstance(past[1], int) or not isinstance(past[3], int):
            raise VlmoptError(f"{files[decoder]} does not declare its key/value heads and head size (past shape {past}); re-make it with `vlmopt convert`")
        self.kv_heads, self.head_dim = int(past[1]), int(past[3])
        self.hidden = int(inputs[INPUTS_EMBEDS].shape[2])
        self.embeds_dtype = np.float16 if inputs[INPUTS_EMBEDS].type == "tensor(float16)" else np.float32
        self.past_dtype = np.float16 if inputs[self.past_names[0]].type == "tensor(float16)" else np.float32

    @staticmethod
    def session(path: Path, threads: int | None) -> Any:
        """One part's session (another back end gives an object with the same `run`, `get_inputs`, `get_outputs`)."""
        return ort_session(path, threads)

    def decoder_session(self, path: Path, threads: int | None) -> Any:
        """A decoder's session, its `logits_to_keep` taken as a plain input, so that the loop's IO binding can ask a
        prefill for its last position's logits only (with the default, every prompt position went through the head:
        Qwen2.5-VL-3B's 151936 x 2048 head over 310 positions roughly doubled the prefill)."""
        return ort_session(path, threads, (LOGITS_TO_KEEP,))

    def encode_images(self, pixel_values: np.ndarray, vision_inputs: dict[str, np.ndarray] | None = None) -> np.ndarray:
        if self.vision is None:
            raise VlmoptError(f"this artifact has no {self.contract.vision.name} part" if self.contract.vision else "this model takes no images")
        feed = {PIXEL_VALUES: pixel_values.astype(np.float32), **(vision_inputs or {})}
        return self.vision.run([IMAGE_FEATURES], feed)[0]

    def embed(self, input_ids: np.ndarray, image_features: np.ndarray | None = None) -> np.ndarray:
        feed = {INPUT_IDS: input_ids.astype(np.int64)}
        if self.embedding_takes_images:
            feed[IMAGE_FEATURES] = np.zeros((0, self.hidden), np.float32) if image_features is None else image_features
        elif image_features is not None and len(image_features):
            raise VlmoptError("this artifact's embedding part takes no image features: the model takes no images")
        return self.embedding.run([INPUTS_EMBEDS], feed)[0]

    def empty_past(self, batch: int, length: int = 0) -> np.ndarray:
        return np.zeros((batch, self.kv_heads, length, self.head_dim), self.past_dtype)

    def step_feed(
        self, inputs_embeds: np.ndarray, attention_mask: np.ndarray, extra: dict[str, np.ndarray] | None = None, positions: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """One decoder run's inputs; `extra`: the contract's per-position decoder inputs for these positions (0 where absent);
        `positions`: these positions' ids where they are not the mask's 1-D ones (M-RoPE), broadcast over the decoder's axes."""
        feed = {INPUTS_EMBEDS: np.ascontiguousarray(inputs_embeds.astype(self.embeds_dtype)), ATTENTION_MASK: np.ascontiguousarray(attention_mask)}
        if self.takes_positions:
            found = position_ids(attention_mask, inputs_embeds.shape[1]) if positions is None else positions.astype(np.int64)
            if self.position_axes and found.ndim == 2:
                found = np.broadcast_to(found, (self.position_axes, *found.shape))
            feed[POSITION_IDS] = np.ascontiguousarray(found)
        for name in self.position_inputs:
            given = (extra or {}).get(name)
            feed[name] = np.zeros(inputs_embeds.shape[:2], np.int64) if given is None else np.ascontiguousarray(given.astype(np.int64))
        if self.keeps_logits:
            feed[LOGITS_TO_KEEP] = np.array(0, np.int64)  # every position, the graph's default; the cache's runs ask for fewer
        return feed

    def decode(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray, extra: dict[str, np.ndarray] | None = None, prompt: bool = False) -> np.ndarray:
        """The logits of one prefill with no past (numpy in and out, unpadded rows: every contract takes those). For
        checks; `prompt`: through the prefill decoder where there is one."""
        batch = inputs_embeds.shape[0]
        past = {name: self.empty_past(batch) for name in self.past_names}
        session = self.prefill if prompt and self.prefill is not None else self.decoder
        return session.run([LOGITS], {**self.step_feed(inputs_embeds, attention_mask, extra), **past})[0]

    def cache(self, batch: int, capacity: int) -> KvCache:
        """A fresh KV cache for one generation of `batch` rows and at most `capacity` positions."""
        return KvCache(self, batch, capacity)

    def close(self) -> None:
        self.vision = self.embedding = self.decoder = self.prefill = None


def prefill_part(contract: GenerativeContract) -> str:
    """The name of the optional prompt-only decoder beside the contract's decoder part (`OrtParts`)."""
    return f"{contract.decoder.name}_prefill"


def loop_files(towers: dict[str, Any], contract: GenerativeContract | None = None) -> dict[str, str]:
    """An artifact's `TowerRecord`s as the loops' `files`: each part's graph, and the decoder's prompt graph
    (`TowerRecord.prefill`, from `quantize --prefill`) as `prefill_part`."""
    contract = contract or GenerativeContract()
    files = {name: record.file or "" for name, record in towers.items()}
    decoder = towers.get(contract.decoder.name)
    if decoder is not None and decoder.prefill:
        files[prefill_part(contract)] = decoder.prefill
    return files


def _signature(session: Any) -> tuple[Any, ...]:
    return tuple((v.name, v.type, tuple(v.shape)) for v in (*session.get_inputs(), *session.get_outputs()))


class KvCache:
    """One generation's KV cache, kept in ONNX Runtime's memory with IO binding, in the decoder's own contract
    (module docstring). Callers speak left padding, as the preprocessor pads; a shared-buffer cache moves each
    prompt to the left edge of its row and hands logits back in the caller's layout."""

    def __init__(self, parts: OrtParts, batch: int, capacity: int):
        import onnxruntime as ort

        self.parts, self.capacity = parts, capacity
        self.binding = parts.decoder.io_binding()
        self.prefill_binding = parts.prefill.io_binding() if parts.prefill is not None else self.binding
        length = capacity if parts.shares_buffer else 0
        self.values = [ort.OrtValue.ortvalue_from_numpy(parts.empty_past(batch, length)) for _ in parts.past_names]
        self.mask: np.ndarray = np.zeros((batch, 0), np.int64)  # concat: the left-padded mask so far
        #: M-RoPE: each row's shift of its decode positions from the mask's 1-D ones (transformers' rope_deltas)
        self.position_offsets: np.ndarray | None = None
        self.lengths = np.zeros(batch, np.int64)  # shared: each row's positions so far

    def _run(
        self,
        inputs_embeds: np.ndarray,
        mask: np.ndarray,
        keep: int = 0,
        extra: dict[str, np.ndarray] | None = None,
        positions: np.ndarray | None = None,
        prompt: bool = False,
    ) -> np.ndarray:
        """One decoder run on the cache (`prompt`: through the prefill decoder where there is one); the logits of the
        last `keep` positions where the decoder takes `logits_to_keep` (0: every position; bound every run, since a
        binding outlives the run)."""
        parts = self.parts
        session, binding = (parts.prefill, self.prefill_binding) if prompt and parts.prefill is not None else (parts.decoder, self.binding)
        for name, value in zip(parts.past_names, self.values, strict=True):
            binding.bind_ortvalue_input(name, value)  # the cache's current values, whichever decoder ran last
        feed = parts.step_feed(inputs_embeds, mask, extra, positions)
        if parts.keeps_logits:
            feed[LOGITS_TO_KEEP] = np.array(keep, np.int64)
        for name, value in feed.items():
            binding.bind_cpu_input(name, value)
        binding.clear_binding_outputs()
        binding.bind_output(LOGITS, "cpu")  # rebound each step: its shape changes from prefill to decode
        for name, value in zip(parts.present_names, self.values, strict=True):
            if parts.shares_buffer:
                binding.bind_ortvalue_output(name, value)
            else:
                binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        if not parts.shares_buffer:
            self.values = list(outputs[1:])  # this step's presents are the next step's pasts: bound as they are, no copy
        return outputs[0].numpy()

    def _shared_mask(self) -> np.ndarray:
        if int(self.lengths.max()) > self.capacity:
            raise VlmoptError(f"the KV cache holds {self.capacity} positions; this step needs {int(self.lengths.max())}")
        return (np.arange(int(self.lengths.max()))[None, :] < self.lengths[:, None]).astype(np.int64)

    def _positions(self, positions: np.ndarray | None, attention_mask: np.ndarray) -> np.ndarray | None:
        """The prompt's own positions (M-RoPE), with each row's offset kept for its decode steps: the row's highest
        position + 1 - its token count, as transformers' rope_deltas (0 for text alone)."""
        if positions is None:
            self.position_offsets = None
            return None
        valid = attention_mask.astype(bool)
        highest = np.where(valid[None], positions, np.iinfo(np.int64).min).max(axis=(0, 2))
        self.position_offsets = highest + 1 - valid.sum(1)
        return positions

    def _step_positions(self, new: int) -> np.ndarray | None:
        if self.position_offsets is None:
            return None
        return position_ids(self.mask, new) + self.position_offsets[:, None]

    def prefill(
        self, inputs_embeds: np.ndarray, attention_mask: np.ndarray, extra: dict[str, np.ndarray] | None = None, positions: np.ndarray | None = None
    ) -> np.ndarray:
        """The prompt (left-padded rows) into the cache; the logits of every position, left-padded like the input.
        `extra`: the contract's per-position decoder inputs over the prompt; `positions`: the prompt's position_ids
        where they are not the mask's (M-RoPE, `Prompt.position_ids`)."""
        if not self.parts.shares_buffer:
            self.mask = attention_mask.astype(np.int64)
            return self._run(inputs_embeds, self.mask, extra=extra, positions=self._positions(positions, attention_mask), prompt=True)
        width = attention_mask.shape[1]
        moved = self._moved_left(inputs_embeds, attention_mask)
        logits = self._run(moved, self._shared_mask()[:, :width], extra=self._extra_moved_left(extra, attention_mask), prompt=True)
        back = np.zeros_like(logits)
        for row, n in enumerate(self.lengths):
            back[row, width - n :] = logits[row, :n]
        return back

    def prefill_last(
        self, inputs_embeds: np.ndarray, attention_mask: np.ndarray, extra: dict[str, np.ndarray] | None = None, positions: np.ndarray | None = None
    ) -> np.ndarray:
        """The prompt into the cache, like `prefill`; only each row's logits at its last position ([batch, vocab]), and
        only those computed where the decoder takes `logits_to_keep` (rows of unequal length in the shared contract:
        from the shortest row's last position on)."""
        width = attention_mask.shape[1]
        if not self.parts.shares_buffer:
            self.mask = attention_mask.astype(np.int64)
            return self._run(inputs_embeds, self.mask, keep=1, extra=extra, positions=self._positions(positions, attention_mask), prompt=True)[:, -1]
        moved = self._moved_left(inputs_embeds, attention_mask)
        keep = width - int(self.lengths.min()) + 1
        logits = self._run(moved, self._shared_mask()[:, :width], keep=keep, extra=self._extra_moved_left(extra, attention_mask), prompt=True)
        first = width - logits.shape[1]  # the position of the first row of logits handed back
        return np.stack([logits[row, n - 1 - first] for row, n in enumerate(self.lengths)])

    def _moved_left(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Each left-padded prompt moved to the left edge of its row (the shared contract), its length kept."""
        width = attention_mask.shape[1]
        self.lengths = attention_mask.sum(1).astype(np.int64)
        if not all(attention_mask[row, width - n :].all() for row, n in enumerate(self.lengths)):
            raise VlmoptError("prompts must be left-padded (zeros only before each row's tokens)")
        moved = np.zeros_like(inputs_embeds)
        for row, n in enumerate(self.lengths):
            moved[row, :n] = inputs_embeds[row, width - n :]
        return moved

    def _extra_moved_left(self, extra: dict[str, np.ndarray] | None, attention_mask: np.ndarray) -> dict[str, np.ndarray] | None:
        """Per-position decoder inputs moved as `_moved_left` moves the prompt (after it has set the lengths)."""
        if not extra:
            return extra
        width = attention_mask.shape[1]
        moved = {name: np.zeros_like(value) for name, value in extra.items()}
        for row, n in enumerate(self.lengths):
            for name, value in extra.items():
                moved[name][row, :n] = value[row, width - n :]
        return moved

    def step(self, inputs_embeds: np.ndarray) -> np.ndarray:
        """New positions after every row's last (one for a batch of several rows in the shared contract); their logits."""
        new = inputs_embeds.shape[1]
        if not self.parts.shares_buffer:
            self.mask = np.concatenate([self.mask, np.ones((len(self.mask), new), np.int64)], axis=1)
            return self._run(inputs_embeds, self.mask, positions=self._step_positions(new))
        self.lengths = self.lengths + new
        return self._run(inputs_embeds, self._shared_mask())

    def keys(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Layer `layer`'s cached keys in the caller's left-padded layout, and the mask of the positions that hold tokens."""
        keys = self.values[2 * layer].numpy()
        if not self.parts.shares_buffer:
            return keys, self.mask.astype(bool)
        width = int(self.lengths.max())
        left = np.zeros((*keys.shape[:2], width, keys.shape[3]), keys.dtype)
        held = np.zeros((len(keys), width), bool)
        for row, n in enumerate(self.lengths):
            left[row, :, width - n :] = keys[row, :, :n]
            held[row, width - n :] = True
        return left, held


class OrtGenerateRunner(GenerateRunner):
    """vlmopt's generation loop over ONNX Runtime sessions, the KV cache kept in ONNX Runtime's memory (IO binding)."""

    backend = "onnxruntime"

    def __init__(self, folder: Path, files: dict[str, str], threads: int | None = None, contract: GenerativeContract | None = None):
        self.parts = OrtParts(folder, files, threads, contract)

    def encode_images(
        self, pixel_values: np.ndarray, vision_inputs: dict[str, np.ndarray] | None = None, reference_inputs: dict[str, np.ndarray] | None = None
    ) -> np.ndarray:
        return self.parts.encode_images(pixel_values, vision_inputs)

    def generate_impl(self, request: GenerateRequest, on_token: OnToken | None) -> GenerateResult:
        parts, prompt = self.parts, request.prompt
        steps = Steps(request, on_token)
        features = None
        if prompt.pixel_values is not None:
            features = parts.encode_images(prompt.pixel_values, prompt.vision_inputs)
            steps.image_encode_s = time.perf_counter() - steps.started
        batch, prompt_length = prompt.attention_mask.shape
        cache = parts.cache(batch, prompt_length + request.max_new_tokens)
        pick = TokenPicker(request.sampling)
        logits = cache.prefill_last(parts.embed(prompt.input_ids, features), prompt.attention_mask, prompt.decoder_inputs, prompt.position_ids)
        while True:
            tokens = steps.add(pick(steps.suppress(logits.astype(np.float32))))
            if steps.finished:
                break
            logits = cache.step(parts.embed(tokens[:, None]))[:, -1, :]
        return steps.result()

    def close(self) -> None:
        self.parts.close()
