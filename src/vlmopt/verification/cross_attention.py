"""Conversion checks of encoder-decoder captioners (the self-and-cross-attention cache layout; BLIP): the vision
part's image_embeds against transformers' vision model; the decoder part, through the cross part's keys and values
and its own past, against transformers' text decoder with its EncoderDecoderCache (prefills at two shapes, one
right-padded, then a decode step); and greedy generation through vlmopt's loop token for token
against transformers' `generate`, on 2 images of different sizes (the processor resizes both to the tower's size)
with 2 caption prefixes each, and a batch of 2 unequal prefixes (right-padded, as BLIP's processor pads)."""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vlmopt.records import DataCheck, MetricCheck, OutputCheck
from vlmopt.samples import sample_image
from vlmopt.verification.compare import compare

#: caption prefixes: none (caption from scratch) and a short one
PREFIXES = ("", "a picture of")
NEW_TOKENS = 16
GENERATION_IDENTICAL = "greedy generation identical to transformers"


def images() -> list[Any]:
    """Two pictures of different sizes and shapes: a square and a wide one."""
    return [sample_image(7), sample_image(8).resize((200, 60))]


def cases(preprocessor: Any) -> list[Any]:
    """The prompts: each image with each prefix, then both images at batch 2 with unequal prefixes."""
    pictures = images()
    single = [preprocessor(prefix, [image]) for image in pictures for prefix in PREFIXES]
    return [*single, preprocessor(["", "a picture of the red cat"], pictures)]


def conversion_checks(
    holder: dict[str, Any], preprocessor: Any, folder: Path, towers: dict[str, Any], threads: int, say: Callable[[str], None]
) -> tuple[dict[str, list[DataCheck]], list[MetricCheck]]:
    import torch

    from vlmopt.runners.generate import GenerateRequest, HfGenerateRunner
    from vlmopt.runners.loops import ort_runner

    family, contract = preprocessor.family, preprocessor.contract
    model = holder.pop("model")
    prompts = cases(preprocessor)
    requests = [GenerateRequest(p, NEW_TOKENS, preprocessor.eos_token_ids, preprocessor.pad_token_id, min_new_tokens=NEW_TOKENS) for p in prompts]
    say(f"computing transformers' references: image_embeds and greedy captions of {NEW_TOKENS} tokens on {len(prompts)} prompts")
    with torch.inference_mode():
        pixels = [preprocessor.images([image])[0] for image in images()]
        embeds = [family.image_features(model, torch.from_numpy(p)).numpy() for p in pixels]
        decoder_cases = _decoder_cases(model, family, pixels)
    with HfGenerateRunner(model=model, family=family) as reference:
        expected = [reference.generate(r).tokens for r in requests]
    del model
    gc.collect()
    files = {name: record.file for name, record in towers.items()}
    with ort_runner(folder, files, threads, contract) as runner:
        worst: dict[str, Any] = {}
        for i, (p, e) in enumerate(zip(pixels, embeds, strict=True)):
            figures = compare(contract.vision.gives[0], e.reshape(-1, e.shape[-1]), runner.encode_images(p).reshape(-1, e.shape[-1]))
            if not worst or figures.max_abs_diff > worst["max"]:
                worst = {"max": figures.max_abs_diff, "cos": figures.cosine_min, "mean": figures.cosine_mean, "where": {"image": i}}
        decoder = _decoder(decoder_cases, runner.parts)
        say(f"greedy generation of {NEW_TOKENS} tokens on {len(prompts)} prompts against transformers' generate")
        got = [runner.generate(r).tokens for r in requests]
    name = contract.vision.gives[0]
    vision = DataCheck(
        "transformers",
        "transformers' vision model, a square and a wide image",
        len(pixels),
        len(pixels),
        {name: OutputCheck(name, worst["max"], worst["cos"], worst["mean"], worst["where"])},
    )
    divergences = [[_first_divergence(a, b) for a, b in zip(x, y, strict=True)] for x, y in zip(expected, got, strict=True)]
    identical = sum(all(d is None for d in row) for row in divergences) / len(prompts)
    metric = MetricCheck(
        GENERATION_IDENTICAL,
        identical,
        f"{len(prompts)} prompts (2 images x {len(PREFIXES)} prefixes, and batch 2 with unequal prefixes) x {NEW_TOKENS} new tokens",
        1.0,
        detail={"first_divergence": divergences},
    )
    return {contract.vision.name: [vision], contract.decoder.name: [decoder]}, [metric]


#: the decoder's checks: (batch, prompt length), the second row of a batch right-padded by DECODER_PADDING, as BLIP pads
DECODER_SHAPES, DECODER_PADDING = ((1, 5), (2, 11)), 3


def _decoder_cases(model: Any, family: Any, pixels: list[np.ndarray]) -> list[dict[str, Any]]:
    """transformers' text decoder (its own mask code and EncoderDecoderCache, cross keys/values computed from the image
    rows) on random prompts at two shapes, then one decode step: the logits the decoder part must give."""
    import torch
    from transformers import DynamicCache, EncoderDecoderCache

    rng = np.random.default_rng(0)
    vocab = int(family.input_embeddings(model).weight.shape[0])
    cases = []
    for batch, length in DECODER_SHAPES:
        images = np.concatenate([pixels[row % len(pixels)] for row in range(batch)])
        rows = family.image_features(model, torch.from_numpy(images))
        ids = rng.integers(0, vocab, (batch, length), dtype=np.int64)
        mask = np.ones((batch, length), np.int64)
        mask[1:, length - DECODER_PADDING :] = 0
        positions = np.where(mask == 0, 0, np.cumsum(mask, 1) - 1)
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        prefill = _reference_step(model, family, ids, mask, positions, rows, cache)
        token = rng.integers(0, vocab, (batch, 1), dtype=np.int64)
        step_mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], 1)
        step = _reference_step(model, family, token, step_mask, positions[:, -1:] + 1, rows, cache)
        cases.append(
            {"pixels": images, "ids": ids, "mask": mask, "token": token, "prefill": prefill, "step": step, "where": {"batch": batch, "sequence": length}}
        )
    return cases


def _reference_step(model: Any, family: Any, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, rows: Any, cache: Any) -> np.ndarray:
    import torch

    out = family.language_model(model)(
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy(mask),
        position_ids=torch.from_numpy(positions),
        encoder_hidden_states=rows,
        cache=cache,
        use_cache=True,
        is_decoder=True,
    )
    return family.lm_head(model)(out.last_hidden_state).numpy()


def _decoder(cases: list[dict[str, Any]], parts: Any) -> DataCheck:
    """The decoder part through vlmopt's caches (cross part's keys and values, self-attention past): its prefill's logits
    at the positions that hold tokens and one decode step's, against transformers'."""
    from vlmopt.families.generative import LOGITS
    from vlmopt.runners.cross_attention import CrossAttentionCache

    worst: dict[str, Any] = {}
    for case in cases:
        cache = CrossAttentionCache(parts, parts.cross_values(parts.encode_images(case["pixels"])), len(case["ids"]))
        valid = case["mask"].astype(bool)
        got = cache.prefill(case["ids"], case["mask"])
        for expected, candidate, past in (
            (case["prefill"][valid], got[valid], 0),
            (case["step"][:, -1], cache.step(case["token"])[:, -1], case["ids"].shape[1]),
        ):
            figures = compare(LOGITS, expected, candidate)
            if not worst or figures.max_abs_diff > worst["max"]:
                worst = {
                    "max": figures.max_abs_diff,
                    "cos": min(figures.cosine_min, worst.get("cos", 1.0)),
                    "mean": figures.cosine_mean,
                    "where": {**case["where"], "past_sequence": past},
                }
            worst["cos"] = min(worst["cos"], figures.cosine_min)
    source = f"transformers' text decoder (its EncoderDecoderCache): prefills at batch x length {DECODER_SHAPES} (right-padded), then a decode step"
    return DataCheck(
        "transformers",
        source,
        2 * len(cases),
        sum(b for b, _ in DECODER_SHAPES),
        {LOGITS: OutputCheck(LOGITS, worst["max"], worst["cos"], worst["mean"], worst["where"])},
    )


def _first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))
