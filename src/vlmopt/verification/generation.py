"""Verification of generative artifacts (vision, embedding and decoder parts with a KV cache).

Every part name, tensor name and Hugging Face path comes from the family's generative contract
(`vlmopt.families.generative`), reached through the preprocessor the family made (`preprocessor.family`).

After `convert` (fp32 parts against transformers itself, not against vlmopt's wrappers):
  * vision: image_features against the family's reference image features (transformers' own), 1 and 2 images;
  * embedding: inputs_embeds against transformers' `masked_scatter` merge, 0, 1 and 2 images, batch 1 and 2;
  * decoder: logits (and the present key of the first layer that keeps every position) against the language model and head run by
    transformers with its own mask code and `DynamicCache`: prompts of two lengths at batch 1 and 2 (left
    padding), then decode steps of 1 and 3 tokens on those pasts (pasts of four different lengths);
  * generation: greedy decoding through vlmopt's ONNX Runtime loop, token for token against transformers'
    `generate`, on several image+prompt pairs (end-of-sequence held back so every pair runs its full length);
    and through onnxruntime-genai where it is installed (recorded, not gated: an optional runtime).

After `quantize` or `openvino` (the variant against its fp32 parent, each through vlmopt's loop on its own back end), on a real English text
that is always here (`vlmopt.samples.english_text`): teacher-forced next-token top-1 agreement, mean KL
divergence and perplexity; and greedy generations on image+prompt pairs: exact-match rate and where each
first diverges. Agreement and perplexity increase are the gates (`--min-token-agreement`, `--max-ppl-increase`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlmopt.families.generative import IMAGE_FEATURES, INPUTS_EMBEDS, LOGITS, SELF_AND_CROSS_ATTENTION
from vlmopt.records import DataCheck, MetricCheck, OutputCheck
from vlmopt.samples import PROMPTS, TEXT_SOURCE, sample_image, text_tokens
from vlmopt.verification.compare import compare

#: greedy generation checks: pairs and new tokens
CONVERSION_PAIRS, CONVERSION_NEW_TOKENS = 3, 32
VARIANT_PAIRS, VARIANT_NEW_TOKENS = 6, 32
#: teacher-forced evaluation: the first TEXT_TOKENS tokens of the text, in windows of WINDOW
TEXT_TOKENS, WINDOW = 2048, 256
GENERATION_IDENTICAL = "greedy generation identical to transformers"
GENAI_IDENTICAL = "onnxruntime-genai generation identical to transformers"
TOKEN_AGREEMENT = "teacher-forced next-token top-1 agreement"
PPL_INCREASE = "perplexity increase"
#: the prefix of the prompt decoder's token figures (`quantize --prefill`)
PROMPT_DECODER = "prompt decoder:"


class _Worst:
    """Per output: the worst max |diff| (and where), the worst and mean row cosine over several comparisons."""

    def __init__(self) -> None:
        self.outputs: dict[str, dict[str, Any]] = {}
        self.feeds = 0

    def add(self, name: str, reference: np.ndarray, candidate: np.ndarray, where: dict[str, int]) -> None:
        figures = compare(name, reference.reshape(-1, reference.shape[-1]), candidate.reshape(-1, candidate.shape[-1]))
        seen = self.outputs.setdefault(name, {"max": -1.0, "where": None, "cos_min": 1.0, "means": []})
        if figures.max_abs_diff > seen["max"]:
            seen["max"], seen["where"] = figures.max_abs_diff, where
        seen["cos_min"] = min(seen["cos_min"], figures.cosine_min)
        seen["means"].append(figures.cosine_mean)

    def check(self, source: str, samples: int) -> DataCheck:
        outputs = {name: OutputCheck(name, seen["max"], seen["cos_min"], float(np.mean(seen["means"])), seen["where"]) for name, seen in self.outputs.items()}
        return DataCheck("transformers", source, self.feeds, samples, outputs)


def _pairs(preprocessor: Any, count: int, offset: int = 0) -> list[Any]:
    """Image+prompt pairs; prompts alone for a family that takes no images (a bare language model)."""
    if not preprocessor.contract.takes_images:
        return [preprocessor(PROMPTS[(offset + i) % len(PROMPTS)] + " and more" * ((offset + i) // len(PROMPTS)), []) for i in range(count)]
    return [preprocessor(PROMPTS[i % len(PROMPTS)], [sample_image(100 + offset + i)]) for i in range(count)]


def _pair_words(preprocessor: Any) -> str:
    return "image+prompt pairs" if preprocessor.contract.takes_images else "prompts"


def _request(preprocessor: Any, prompt: Any, new_tokens: int) -> Any:
    from vlmopt.runners.generate import GenerateRequest

    return GenerateRequest(prompt, new_tokens, preprocessor.eos_token_ids, preprocessor.pad_token_id, min_new_tokens=new_tokens)


def _first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


# -- after convert ---------------------------------------------------------------------------------
@dataclass
class _Case:
    """One check's inputs, transformers' outputs for them, and where it was taken."""

    inputs: dict[str, Any]
    expected: dict[str, np.ndarray]
    where: dict[str, int]


@dataclass
class _References:
    """Everything transformers computed for the checks, kept so the model can go before any part is loaded."""

    vision: list[_Case]
    embedding: list[_Case]
    decoder: list[list[_Case]]  # per sequence: its prefill, then its decode steps
    pairs: list[Any]
    tokens: list[list[int]]


def conversion_checks(
    holder: dict[str, Any], preprocessor: Any, folder: Path, towers: dict[str, Any], threads: int, say: Callable[[str], None]
) -> tuple[dict[str, list[DataCheck]], list[MetricCheck]]:
    """The parts in `folder` against transformers' model (`holder["model"]`, loaded, fp32): data checks per part and
    the generation checks. Every reference is computed first and the model is then taken out of `holder`, its last
    reference, so its memory is free before vlmopt's and onnxruntime-genai's sessions load the parts (model a: the
    whole convert peaked at 2505 MB with the model and the parts loaded together)."""
    import gc

    from vlmopt.families.base import SHARED, kv_contract
    from vlmopt.runners.generate import OrtGenerateRunner

    contract = preprocessor.contract
    if contract.cache == SELF_AND_CROSS_ATTENTION:
        from vlmopt.verification import cross_attention

        return cross_attention.conversion_checks(holder, preprocessor, folder, towers, threads, say)
    shares_buffer = kv_contract(towers[contract.decoder.name].tower) == SHARED
    say(f"computing transformers' references: {'image features, ' if contract.takes_images else ''}embeddings, decoder logits, greedy generations")
    references = _references(holder.pop("model"), preprocessor, shares_buffer)
    gc.collect()
    files = {name: record.file for name, record in towers.items()}
    checks: dict[str, list[DataCheck]] = {}
    with OrtGenerateRunner(folder, files, threads, contract) as runner:
        parts = runner.parts
        say(f"checking the {', '.join(contract.part_names)} parts against transformers (prefill and decode steps)")
        if contract.vision is not None:
            checks[contract.vision.name] = [_vision(references.vision, parts)]
        checks[contract.embedding.name] = [_embedding(references.embedding, parts)]
        checks[contract.decoder.name] = [_decoder(references.decoder, parts)]
        say(f"greedy generation of {CONVERSION_NEW_TOKENS} tokens on {CONVERSION_PAIRS} {_pair_words(preprocessor)} against transformers' generate")
        metrics = _generation(references, preprocessor, runner)
    # onnxruntime-genai loads every part again: our sessions go first (model a: convert peaked at 3602 MB with both
    # open, 2743 MB this way)
    genai = _genai_generation(preprocessor, folder, threads, references.pairs, references.tokens)
    if genai is not None:
        metrics.append(genai)
    return checks, metrics


def _references(model: Any, preprocessor: Any, shares_buffer: bool) -> _References:
    import torch

    from vlmopt.runners.generate import HfGenerateRunner

    family = preprocessor.family
    with torch.inference_mode(), preprocessor.image_processor_settings(family.part_check_image_processor):
        vision = _vision_cases(model, preprocessor) if preprocessor.contract.takes_images else []
        embedding = _embedding_cases(model, preprocessor)
        decoder = _decoder_cases(model, family, shares_buffer)
    pairs = _pairs(preprocessor, CONVERSION_PAIRS)
    with HfGenerateRunner(model=model, family=family) as reference:
        tokens = [reference.generate(_request(preprocessor, p, CONVERSION_NEW_TOKENS)).tokens[0] for p in pairs]
    return _References(vision, embedding, decoder, pairs, tokens)


def _image_features(
    model: Any, preprocessor: Any, pixel_values: np.ndarray, vision_inputs: dict[str, np.ndarray], reference_inputs: dict[str, np.ndarray]
) -> Any:
    """transformers' image features, found where the family says."""
    import torch

    vision, reference = ({name: torch.from_numpy(value) for name, value in found.items()} for found in (vision_inputs, reference_inputs))
    return preprocessor.family.image_features(model, torch.from_numpy(pixel_values), vision, reference)


def _vision_cases(model: Any, preprocessor: Any) -> list[_Case]:
    cases = []
    for count in (1, 2):
        pixels, extra, reference = preprocessor.images([sample_image(i) for i in range(count)])
        expected = {IMAGE_FEATURES: _image_features(model, preprocessor, pixels, extra, reference).numpy()}
        cases.append(_Case({"pixels": pixels, "vision_inputs": extra}, expected, {"num_images": count}))
    return cases


def _vision(cases: list[_Case], parts: Any) -> DataCheck:
    worst = _Worst()
    for case in cases:
        worst.add(IMAGE_FEATURES, case.expected[IMAGE_FEATURES], parts.encode_images(case.inputs["pixels"], case.inputs["vision_inputs"]), case.where)
        worst.feeds += 1
    return worst.check("the family's reference image features (transformers'), 1 and 2 drawn images", 3)


def _embedding_cases(model: Any, preprocessor: Any) -> list[_Case]:
    import torch

    cases = []
    shapes = ((1, [0]), (1, [1]), (1, [2]), (2, [1, 1])) if preprocessor.contract.takes_images else ((1, [0]), (2, [0, 0]))
    for batch, counts in shapes:  # (batch, images per prompt)
        images = [sample_image(10 * row + i) for row, n in enumerate(counts) for i in range(n)]
        prompt = preprocessor([PROMPTS[row] + " and more" * row for row in range(batch)], images, images_per_prompt=counts)
        ids = torch.from_numpy(prompt.input_ids)
        reference = preprocessor.family.input_embeddings(model)(ids)
        features = None
        if images:
            features = _image_features(model, preprocessor, prompt.pixel_values, prompt.vision_inputs, prompt.reference_inputs)
            mask = (ids == preprocessor.image_token_id).unsqueeze(-1).expand_as(reference)
            reference = reference.masked_scatter(mask, features)
        inputs = {"input_ids": prompt.input_ids, "image_features": None if features is None else features.numpy()}
        where = {"batch": batch, "num_images": len(images)} if preprocessor.contract.takes_images else {"batch": batch}
        cases.append(_Case(inputs, {INPUTS_EMBEDS: reference.numpy()}, where))
    return cases


def _embedding(cases: list[_Case], parts: Any) -> DataCheck:
    worst = _Worst()
    for case in cases:
        worst.add(INPUTS_EMBEDS, case.expected[INPUTS_EMBEDS], parts.embed(case.inputs["input_ids"], case.inputs["image_features"]), case.where)
        worst.feeds += 1
    if not parts.embedding_takes_images:
        return worst.check("the reference's token embeddings of prompts at batch 1 and 2 (left-padded)", len(cases))
    return worst.check("masked_scatter of the reference image features; 0, 1, 2 images at batch 1, 1 image each at batch 2", 5)


def _reference_step(model: Any, family: Any, embeds: Any, mask: Any, cache: Any) -> tuple[Any, Any]:
    """transformers' own path: a 2-D mask, its positions, its DynamicCache, then the head (where the family says they are)."""
    import torch

    from vlmopt.inputs import position_ids

    positions = torch.from_numpy(position_ids(mask.numpy(), embeds.shape[1]))
    out = family.language_model(model)(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
    return family.lm_head(model)(out.last_hidden_state), out.past_key_values


DECODER_LENGTHS, DECODER_PADDING = (7, 23), 3


def _decoder_cases(model: Any, family: Any, shares_buffer: bool) -> list[list[_Case]]:
    """Prefills of two lengths at batch 1 and 2 (the second row left-padded), each followed by decode steps of 1 and
    3 new positions. A shared-buffer decoder (GroupQueryAttention) takes several new positions on a past only at
    batch 1, so at batch 2 its 3-position step is left out."""
    import torch
    from transformers import DynamicCache

    text_config = family.text_config(model.config)
    rng = np.random.default_rng(0)
    scale = float(family.input_embeddings(model).weight.detach().std())
    steps = {1: (1, 3), 2: (1,) if shares_buffer else (1, 3)}
    sequences = []
    for length in DECODER_LENGTHS:
        for batch in (1, 2):
            embeds = torch.from_numpy((rng.standard_normal((batch, length, text_config.hidden_size)) * scale).astype(np.float32))
            mask = torch.ones(batch, length, dtype=torch.int64)
            if batch == 2:
                mask[1, :DECODER_PADDING] = 0
            reference, cache = _reference_step(model, family, embeds, mask, DynamicCache(config=text_config))
            inputs = {"embeds": embeds.numpy(), "mask": mask.numpy(), "capacity": length + sum(steps[batch])}
            cases = [_Case(inputs, {LOGITS: reference.numpy()}, {"batch": batch, "sequence": length, "past_sequence": 0})]
            for new in steps[batch]:
                past_length = mask.shape[1]
                step = torch.from_numpy((rng.standard_normal((batch, new, text_config.hidden_size)) * scale).astype(np.float32))
                mask = torch.cat([mask, torch.ones(batch, new, dtype=torch.int64)], 1)
                reference, cache = _reference_step(model, family, step, mask, cache)
                # the first layer whose reference cache holds every position (a sliding-window layer keeps its window only)
                layer = next(i for i, held in enumerate(cache.layers) if held.keys.shape[2] == mask.shape[1])
                expected = {LOGITS: reference.numpy(), f"present.{layer}.key": cache.layers[layer].keys.numpy().copy()}
                cases.append(_Case({"embeds": step.numpy()}, expected, {"batch": batch, "sequence": new, "past_sequence": past_length}))
            sequences.append(cases)
    return sequences


def _decoder(sequences: list[list[_Case]], parts: Any) -> DataCheck:
    """Each sequence through the decoder's own KV cache (`KvCache`): the prefill's logits at the positions that hold
    tokens, each step's logits and the first layer's cached keys."""
    worst = _Worst()
    for prefill, *steps in sequences:
        kv = parts.cache(len(prefill.inputs["mask"]), prefill.inputs["capacity"])
        logits = kv.prefill(prefill.inputs["embeds"], prefill.inputs["mask"])
        valid = prefill.inputs["mask"].astype(bool)
        worst.add(LOGITS, prefill.expected[LOGITS][valid], logits[valid], prefill.where)
        worst.feeds += 1
        for step in steps:
            worst.add(LOGITS, step.expected[LOGITS], kv.step(step.inputs["embeds"]), step.where)
            name = next(key for key in step.expected if key != LOGITS)
            keys, held = kv.keys(int(name.split(".")[1]))
            worst.add(name, step.expected[name].transpose(0, 2, 1, 3)[held], keys.transpose(0, 2, 1, 3)[held], step.where)
            worst.feeds += 1
    left_out = ", 3 only at batch 1 (GroupQueryAttention)" if parts.shares_buffer else ""
    lengths = DECODER_LENGTHS
    return worst.check(
        f"prefill of {lengths[0]} and {lengths[1]} positions at batch 1 and 2 (left-padded), then decode steps of 1 and 3{left_out}", worst.feeds
    )


def _generation(references: _References, preprocessor: Any, runner: Any) -> list[MetricCheck]:
    """Greedy tokens of vlmopt's ONNX Runtime loop against transformers' generate (computed beforehand)."""
    pairs, expected = references.pairs, references.tokens
    got = [runner.generate(_request(preprocessor, p, CONVERSION_NEW_TOKENS)).tokens[0] for p in pairs]
    divergences = [_first_divergence(a, b) for a, b in zip(expected, got, strict=True)]
    identical = sum(d is None for d in divergences)
    detail = {"pairs": len(pairs), "new_tokens": CONVERSION_NEW_TOKENS, "first_divergence": divergences, "texts": [preprocessor.decode(t)[:200] for t in got]}
    return [
        MetricCheck(
            GENERATION_IDENTICAL,
            identical / len(pairs),
            f"{len(pairs)} {_pair_words(preprocessor)} x {CONVERSION_NEW_TOKENS} new tokens, vlmopt's ONNX Runtime loop",
            threshold=1.0,
            detail=detail,
            gate="(every pair must match token for token)",
        )
    ]


def _genai_generation(preprocessor: Any, folder: Path, threads: int, pairs: list[Any], expected: list[list[int]]) -> MetricCheck | None:
    """The same pairs through onnxruntime-genai, where it is installed and runs the family: recorded (an optional runtime), not gated."""
    from vlmopt.errors import VlmoptError
    from vlmopt.runners.genai import GenaiGenerateRunner, genai_version

    version = genai_version()
    if version is None or preprocessor.contract.genai_model_type is None:
        return None
    data = f"{len(pairs)} {_pair_words(preprocessor)} x {CONVERSION_NEW_TOKENS} new tokens, onnxruntime-genai {version}"
    try:
        with GenaiGenerateRunner(folder, preprocessor.image_token_id, threads) as genai:
            got = [genai.generate(_request(preprocessor, p, CONVERSION_NEW_TOKENS)).tokens[0] for p in pairs]
    except (VlmoptError, RuntimeError) as exc:
        return MetricCheck(GENAI_IDENTICAL, 0.0, data, detail={"error": str(exc).splitlines()[0][:300], "version": version})
    divergences = [_first_divergence(a, b) for a, b in zip(expected, got, strict=True)]
    value = sum(d is None for d in divergences) / len(pairs)
    return MetricCheck(GENAI_IDENTICAL, value, data, detail={"first_divergence": divergences, "version": version})


# -- after quantize --------------------------------------------------------------------------------
def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def teacher_forced(reference: Any, candidate: Any, ids: np.ndarray, window: int, prompt: bool = False) -> dict[str, Any]:
    """Both decoders on the same real tokens, each window a fresh prefill: agreement, KL(reference || candidate), perplexities.
    `prompt`: the candidate's prompt decoder instead of its decoder."""
    agree, kl, nll_reference, nll_candidate = [], [], [], []
    for start in range(0, len(ids) - window + 1, window):
        chunk = ids[None, start : start + window]
        mask = np.ones_like(chunk)
        outputs = [
            _log_softmax(parts.decode(parts.embed(chunk), mask, prompt=True) if parts is candidate and prompt else parts.decode(parts.embed(chunk), mask))[
                0, :-1
            ]
            for parts in (reference, candidate)
        ]
        target = chunk[0, 1:]
        agree.append(outputs[0].argmax(-1) == outputs[1].argmax(-1))
        kl.append((np.exp(outputs[0]) * (outputs[0] - outputs[1])).sum(-1))
        nll_reference.append(-outputs[0][np.arange(len(target)), target])
        nll_candidate.append(-outputs[1][np.arange(len(target)), target])
    agree_all, kl_all, ref_all, cand_all = (np.concatenate(x) for x in (agree, kl, nll_reference, nll_candidate))
    ppl_reference, ppl_candidate = float(np.exp(ref_all.mean())), float(np.exp(cand_all.mean()))
    return {
        "positions": int(len(agree_all)),
        "window": window,
        "top1_agreement": float(agree_all.mean()),
        "mean_kl": float(kl_all.mean()),
        "ppl_reference": ppl_reference,
        "ppl_candidate": ppl_candidate,
        "ppl_increase": ppl_candidate / ppl_reference - 1,
    }


def variant_checks(
    preprocessor: Any, reference_dir: Path, reference: Any, folder: Path, candidate: Any, gates: Any, threads: int, say: Callable[[str], None]
) -> list[MetricCheck]:
    """A quantized variant against its fp32 parent: teacher-forced agreement, KL and perplexity on the real text, greedy matches."""
    from vlmopt.runners.generate import loop_files
    from vlmopt.runners.loops import loop_runner

    contract = preprocessor.contract
    files = loop_files(candidate.towers, contract)
    engines = {name: record.engine for name, record in candidate.towers.items()}
    reference_files = loop_files(reference.towers, contract)
    ids, identity = text_tokens(preprocessor.tokenizer, TEXT_TOKENS)
    window = min(WINDOW, preprocessor.max_positions, len(ids))
    with loop_runner(reference_dir, reference_files, threads, contract) as fp32, loop_runner(folder, files, threads, contract, engines) as variant:
        say(f"teacher-forced next-token agreement and perplexity over {len(ids)} tokens of {TEXT_SOURCE}")
        scores = teacher_forced(fp32.parts, variant.parts, ids, window)
        prompt_scores = None
        if getattr(variant.parts, "prefill", None) is not None:  # the prompt decoder (`quantize --prefill`) is gated on its own
            say("the same for the prompt decoder")
            prompt_scores = teacher_forced(fp32.parts, variant.parts, ids, window, prompt=True)
        say(f"greedy generation of {VARIANT_NEW_TOKENS} tokens on {VARIANT_PAIRS} {_pair_words(preprocessor)}, fp32 against the variant")
        with preprocessor.image_processor_settings(preprocessor.family.part_check_image_processor):
            pairs = _pairs(preprocessor, VARIANT_PAIRS, offset=100)
        divergences, matched = [], []
        for prompt in pairs:
            request = _request(preprocessor, prompt, VARIANT_NEW_TOKENS)
            a, b = fp32.generate(request).tokens[0], variant.generate(request).tokens[0]
            divergences.append(_first_divergence(a, b))
            matched.append(float(np.mean([x == y for x, y in zip(a, b, strict=False)])))
        cosine = None
        if pairs and pairs[0].pixel_values is not None:
            a, b = (runner.encode_images(pairs[0].pixel_values, pairs[0].vision_inputs) for runner in (fp32, variant))
            cosine = float(compare(IMAGE_FEATURES, a, b).cosine_min)
    text = f"{scores['positions']} positions of {TEXT_SOURCE}, windows of {window}"
    detail = {**scores, "text": identity}
    greedy = {"pairs": len(pairs), "new_tokens": VARIANT_NEW_TOKENS, "first_divergence": divergences, "token_match_rate": float(np.mean(matched))}
    return [
        MetricCheck(TOKEN_AGREEMENT, scores["top1_agreement"], text, gates.min_token_agreement, detail=detail, gate="--min-token-agreement"),
        MetricCheck(PPL_INCREASE, scores["ppl_increase"], text, gates.max_ppl_increase, higher_is_better=False, detail=detail, gate="--max-ppl-increase"),
        MetricCheck("mean KL divergence (fp32 || variant), nats", scores["mean_kl"], text, higher_is_better=False),
        MetricCheck(
            "greedy exact-match rate",
            sum(d is None for d in divergences) / len(pairs),
            f"{len(pairs)} {_pair_words(preprocessor)} x {VARIANT_NEW_TOKENS} new tokens",
            detail={**greedy, "image_features_cosine_min": cosine},
        ),
        *_prompt_checks(prompt_scores, text, identity, gates),
    ]


def _prompt_checks(scores: dict[str, Any] | None, text: str, identity: Any, gates: Any) -> list[MetricCheck]:
    """The prompt decoder's (`quantize --prefill`) own token figures, under the same gates as the decoder's: every
    prompt runs through it, so its first token and the cache it fills are as good as it is."""
    if scores is None:
        return []
    detail = {**scores, "text": identity, "graph": "prompt"}
    return [
        MetricCheck(
            f"{PROMPT_DECODER} {TOKEN_AGREEMENT}", scores["top1_agreement"], text, gates.min_token_agreement, detail=detail, gate="--min-token-agreement"
        ),
        MetricCheck(
            f"{PROMPT_DECODER} {PPL_INCREASE}",
            scores["ppl_increase"],
            text,
            gates.max_ppl_increase,
            higher_is_better=False,
            detail=detail,
            gate="--max-ppl-increase",
        ),
    ]
