"""vlmopt's ONNX Runtime generation loop for encoder-decoder captioners (the `self-and-cross-attention` cache layout
of `vlmopt.families.generative`; BLIP, `vlmopt.families.blip`).

Per generation: the vision part once (pixel_values -> image_embeds), the cross part once (image_embeds -> every
layer's cross-attention keys and values: the cross-attention cache), then the decoder on token ids with those
keys and values bound as inputs at every step (never copied: the same OrtValues) and its self-attention KV cache
passed on as in the concat contract (`vlmopt.runners.generate.KvCache`). Positions are transformers' generate's
(`CrossAttentionCache.step`), and the prompt's padding stays where the processor put it (BLIP's right padding).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from vlmopt.errors import VlmoptError
from vlmopt.families.generative import ATTENTION_MASK, INPUT_IDS, LOGITS, PIXEL_VALUES, POSITION_IDS, GenerativeContract
from vlmopt.runners.generate import GenerateRequest, GenerateResult, GenerateRunner, OnToken, Steps, TokenPicker, ort_session


class CrossAttentionParts:
    """The vision, cross and decoder sessions of one encoder-decoder artifact (named by the family's contract)."""

    def __init__(self, folder: Path, files: dict[str, str], threads: int | None, contract: GenerativeContract):
        self.contract = contract
        names = contract.part_names
        missing = [name for name in names if name not in files]
        if missing:
            raise VlmoptError(f"{folder} has no {' and no '.join(missing)} part; an encoder-decoder captioner needs {', '.join(names)}")
        vision, cross, decoder = (ort_session(folder / files[name], threads) for name in names)
        self.vision, self.cross, self.decoder = vision, cross, decoder
        self.image_embeds = contract.vision.gives[0]
        self.cross_names = [o.name for o in cross.get_outputs()]
        inputs = {i.name: i for i in decoder.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.present_names = [o.name for o in decoder.get_outputs() if o.name.startswith("present.")]
        if not self.past_names or len(self.past_names) != len(self.present_names) or not all(n in inputs for n in self.cross_names):
            raise VlmoptError(f"{files[decoder and contract.decoder.name]} is not a decoder with a self-attention cache and the cross part's keys and values")
        past = inputs[self.past_names[0]].shape
        self.kv_heads, self.head_dim = int(past[1]), int(past[3])

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.vision.run([self.image_embeds], {PIXEL_VALUES: pixel_values.astype(np.float32)})[0]

    def cross_values(self, image_embeds: np.ndarray) -> list[Any]:
        """The cross-attention cache: every layer's keys and values as OrtValues, bound unchanged at every step."""
        binding = self.cross.io_binding()
        binding.bind_cpu_input(self.contract.embedding.takes[0], np.ascontiguousarray(image_embeds))
        for name in self.cross_names:
            binding.bind_output(name, "cpu")
        self.cross.run_with_iobinding(binding)
        return list(binding.get_outputs())

    def embed(self, input_ids: np.ndarray, image_features: np.ndarray | None = None) -> np.ndarray:
        """The decoder's input for these tokens: the ids themselves (its embeddings are inside it). With `decode`, what
        teacher-forced checks call on any family's parts (`vlmopt.verification.generation.teacher_forced`)."""
        return input_ids

    def decode(self, input_ids: np.ndarray, attention_mask: np.ndarray, extra: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """The logits of one prefill with no past, cross-attending to an all-zero pixel input (the normalized mean
        colour: text scored under a fixed, neutral image), for checks."""
        shape = self.vision.get_inputs()[0].shape
        pixels = np.zeros((len(input_ids), *shape[1:]), np.float32)
        cache = CrossAttentionCache(self, self.cross_values(self.encode_images(pixels)), len(input_ids))
        return cache.prefill(input_ids, attention_mask)

    def close(self) -> None:
        self.vision = self.cross = self.decoder = None


class CrossAttentionCache:
    """One generation's caches: the cross-attention keys and values (fixed) and the self-attention past (grown each step)."""

    def __init__(self, parts: CrossAttentionParts, cross: list[Any], batch: int):
        import onnxruntime as ort

        self.parts = parts
        self.binding = parts.decoder.io_binding()
        for name, value in zip(parts.cross_names, cross, strict=True):
            self.binding.bind_ortvalue_input(name, value)
        empty = np.zeros((batch, parts.kv_heads, 0, parts.head_dim), np.float32)
        self.values = [ort.OrtValue.ortvalue_from_numpy(empty) for _ in parts.past_names]
        self.mask = np.zeros((batch, 0), np.int64)

    def run(self, input_ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """New positions (ids) over the cache, `mask` covering past and new; their logits."""
        parts, binding = self.parts, self.binding
        self.mask, self.positions = mask.astype(np.int64), positions.astype(np.int64)
        binding.bind_cpu_input(INPUT_IDS, np.ascontiguousarray(input_ids.astype(np.int64)))
        binding.bind_cpu_input(ATTENTION_MASK, np.ascontiguousarray(self.mask))
        binding.bind_cpu_input(POSITION_IDS, np.ascontiguousarray(self.positions))
        for name, value in zip(parts.past_names, self.values, strict=True):
            binding.bind_ortvalue_input(name, value)
        binding.clear_binding_outputs()
        binding.bind_output(LOGITS, "cpu")
        for name in parts.present_names:
            binding.bind_output(name, "cpu")
        parts.decoder.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        self.values = list(outputs[1:])
        return outputs[0].numpy()

    def prefill(self, input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The prompt; positions as transformers' generate makes them from the mask (count of ones so far, 0 on padding)."""
        return self.run(input_ids, mask, np.where(mask == 0, 0, np.cumsum(mask, 1) - 1))

    def step(self, input_ids: np.ndarray) -> np.ndarray:
        """New tokens after every row's last column; positions go on from the last column's, as transformers' generate
        continues them (on a right-padded row that is the padding's 0: BLIP's batches do that, and so does vlmopt)."""
        new = input_ids.shape[1]
        positions = self.positions[:, -1:] + 1 + np.arange(new)[None, :]
        return self.run(input_ids, np.concatenate([self.mask, np.ones(input_ids.shape, np.int64)], 1), positions)


class CrossAttentionGenerateRunner(GenerateRunner):
    """vlmopt's loop over an encoder-decoder captioner's parts: images and cross-attention cache once, then token steps."""

    backend = "onnxruntime"

    def __init__(self, folder: Path, files: dict[str, str], threads: int | None, contract: GenerativeContract):
        self.parts = CrossAttentionParts(folder, files, threads, contract)

    def encode_images(self, pixel_values: np.ndarray, *inputs: Any) -> np.ndarray:
        """image_embeds; the vision part takes pixels only (other inputs a caller passes are not its)."""
        return self.parts.encode_images(pixel_values)

    def generate_impl(self, request: GenerateRequest, on_token: OnToken | None) -> GenerateResult:
        parts, prompt = self.parts, request.prompt
        if prompt.pixel_values is None or len(prompt.pixel_values) != request.batch:
            raise VlmoptError(f"an encoder-decoder captioner takes one image per prompt; {request.batch} prompt(s), {prompt.num_images} image(s)")
        steps = Steps(request, on_token)
        embeds = parts.encode_images(prompt.pixel_values)
        steps.image_encode_s = time.perf_counter() - steps.started
        cache = CrossAttentionCache(parts, parts.cross_values(embeds), request.batch)
        pick = TokenPicker(request.sampling)
        logits = cache.prefill(prompt.input_ids, prompt.attention_mask)[:, -1]
        while True:
            tokens = steps.add(pick(steps.suppress(logits.astype(np.float32))))
            if steps.finished:
                break
            logits = cache.step(tokens[:, None])[:, -1]
        return steps.result()

    def close(self) -> None:
        self.parts.close()
