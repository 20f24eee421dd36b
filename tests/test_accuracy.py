"""The accuracy-aware orchestration's own rules: disjoint halves of the gate's data, the budget as a share, and the
summary line that leaves the choice to the user when the gate and the speed target cannot both be had."""

from __future__ import annotations

import numpy as np

from vlmopt.quantization.accuracy import SPEED_TARGET, split, summary
from vlmopt.quantization.fallback import layer_budget


def _text_batch(lengths: list[int], width: int) -> dict[str, np.ndarray]:
    mask = np.array([[1] * n + [0] * (width - n) for n in lengths], dtype=np.int64)
    return {"input_ids": np.arange(len(lengths) * width, dtype=np.int64).reshape(len(lengths), width) * mask, "attention_mask": mask}


def test_the_search_and_held_out_halves_are_disjoint_and_cover_every_row() -> None:
    feeds = [_text_batch([3, 5, 2, 4], 5), _text_batch([1, 2, 3], 3)]

    search, held = split(feeds)

    rows = lambda part: {int(r.max()) for f in part for r in f["input_ids"]}  # noqa: E731 - each row's largest id names it
    assert rows(search).isdisjoint(rows(held))
    assert rows(search) | rows(held) == {int(r.max()) for f in feeds for r in f["input_ids"]}


def test_each_half_is_padded_to_its_own_longest_row_only() -> None:
    search, held = split([_text_batch([2, 5, 3, 1], 5)])

    assert search[0]["input_ids"].shape == (2, 3)
    assert held[0]["attention_mask"].shape == (2, 5)


def test_a_graph_of_fixed_batch_is_split_by_whole_batches() -> None:
    feeds = [_text_batch([2, 2], 2) for _ in range(4)]

    search, held = split(feeds, fixed_batch=True)

    assert [f["input_ids"].shape for f in search + held] == [(2, 2)] * 4


def test_the_budget_is_a_share_of_the_layers_and_never_all_of_them() -> None:
    assert layer_budget(0.5, 36) == 18
    assert layer_budget(None, 36) == 18
    assert layer_budget(1.0, 13) == 12
    assert layer_budget(0.0, 13) == 0


def _kept(fp32_ms: float, quantized_ms: float, with_fallback_ms: float) -> dict:
    return {
        "needed": True,
        "kept": [{"node": "a"}],
        "quantized_layers": 4,
        "tier": "fp32",
        "fully_quantized": {"search": 0.99, "held_out": 0.985},
        "reached": {"search": 0.996, "held_out": 0.9955},
        "speed": {"total_fp32_ms": fp32_ms, "total_quantized_ms": quantized_ms, "total_with_fallback_ms": with_fallback_ms},
    }


def test_a_fallback_slower_than_the_target_names_the_fully_quantized_choice() -> None:
    line = summary("text", _kept(100.0, 62.5, 90.0))

    assert f"misses the {SPEED_TARGET:g}x target" in line
    assert "--no-fallback --min-cosine off ships the fully quantized graph (1.60x fp32, cosine min 0.9850)" in line


def test_a_fallback_that_meets_the_target_offers_no_other_choice() -> None:
    line = summary("text", _kept(100.0, 50.0, 60.0))

    assert f"meets the {SPEED_TARGET:g}x target" in line and "--no-fallback" not in line
