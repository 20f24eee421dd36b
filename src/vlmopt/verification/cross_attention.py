"""Conversion checks of encoder-decoder captioners (the self-and-cross-attention cache layout; BLIP): the vision
part's image_embeds against transformers' vision model, and greedy generation through vlmopt's loop token for token
against transformers' `generate`, on 2 images of different sizes (the processor resizes both to the tower's size)
with 2 caption prefixes each, and a batch of 2 unequal prefixes (right-padded, as BLIP's processor pads)."""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

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

    from vlmopt.runners.generate import GenerateRequest, HfGenerateRunner, ort_runner

    family, contract = preprocessor.family, preprocessor.contract
    model = holder.pop("model")
    prompts = cases(preprocessor)
    requests = [GenerateRequest(p, NEW_TOKENS, preprocessor.eos_token_ids, preprocessor.pad_token_id, min_new_tokens=NEW_TOKENS) for p in prompts]
    say(f"computing transformers' references: image_embeds and greedy captions of {NEW_TOKENS} tokens on {len(prompts)} prompts")
    with torch.inference_mode():
        pixels = [preprocessor.images([image])[0] for image in images()]
        embeds = [family.image_features(model, torch.from_numpy(p)).numpy() for p in pixels]
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
    return {contract.vision.name: [vision]}, [metric]


def _first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))
