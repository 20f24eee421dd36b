"""`make bench-blip-cross`: BLIP's decode step with the cross-attention keys/values cached against recomputed.

The choice behind `vlmopt.families.blip`'s `cross` part: at BLIP-base's text decoder sizes (BERT-base: 12 layers,
hidden 768, cross-attention to 577 image rows of 768, random weights), one decode step of one token after a prompt
of `--past` tokens, run by transformers' own BLIP text decoder (`BlipTextLMHeadModel`) in PyTorch fp32:
  cached      the cross-attention keys and values given (an `EncoderDecoderCache` whose cross half is filled), as
              vlmopt's loop binds the cross part's outputs at every step;
  recomputed  the same step with the cross half empty, so every layer projects the image rows again.
The two take turns round after round (interleaved); the medians and their ratio are printed, and the two steps'
logits are compared (they must agree). A benchmark reports; it does not gate.

  python benchmarks/blip_cross_cache.py [--rounds 20] [--past 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--past", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from transformers import BlipTextConfig, DynamicCache, EncoderDecoderCache
    from transformers.models.blip.modeling_blip_text import BlipTextLMHeadModel

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    config = BlipTextConfig(encoder_hidden_size=768)  # BLIP-base's text decoder: 12 layers, hidden 768, vocab 30524
    model = BlipTextLMHeadModel(config).eval()
    image = torch.randn(1, 577, 768)  # ViT-B/16 at 384 px: 24 x 24 patches and the class token
    prompt = torch.randint(0, config.vocab_size, (1, args.past))
    token = torch.randint(0, config.vocab_size, (1, 1))
    with torch.inference_mode():
        prefill = model(input_ids=prompt, encoder_hidden_states=image, cache=EncoderDecoderCache(DynamicCache(), DynamicCache()), use_cache=True)
        cache = prefill.cache

        def step(cached: bool) -> tuple[float, torch.Tensor]:
            own = copy.deepcopy(cache.self_attention_cache)
            past = EncoderDecoderCache(own, copy.deepcopy(cache.cross_attention_cache) if cached else DynamicCache())
            if cached:
                past.is_updated = dict.fromkeys(range(config.num_hidden_layers), True)
            started = time.perf_counter()
            logits = model(input_ids=token, encoder_hidden_states=image, cache=past, use_cache=True).logits
            return time.perf_counter() - started, logits

        times: dict[str, list[float]] = {"cached": [], "recomputed": []}
        outputs = {}
        step(True), step(False)  # warm-up
        for _ in range(args.rounds):
            for name in times:
                seconds, outputs[name] = step(name == "cached")
                times[name].append(seconds)
    diff = float((outputs["cached"] - outputs["recomputed"]).abs().max())
    with open("/proc/loadavg") as handle:
        load = handle.read().split()[:3]
    cached, recomputed = (statistics.median(times[name]) * 1000 for name in ("cached", "recomputed"))
    print(
        f"BLIP-base text decoder, one decode step after {args.past} tokens, {args.threads} threads, {args.rounds} interleaved rounds; load average {' '.join(load)}"
    )
    print(f"  cached cross keys/values   {cached:8.2f} ms (median)")
    print(f"  recomputed from image rows {recomputed:8.2f} ms (median)")
    print(f"  recomputed / cached        {recomputed / cached:8.2f}x   (logits max |diff| {diff:.2e})")


if __name__ == "__main__":
    main()
