"""The accuracy-aware orchestration's own rules: disjoint halves of the gate's data, the budget as a share, and the
summary line that leaves the choice to the user when the gate and the speed target cannot both be had."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from vlmopt.quantization.accuracy import SPEED_TARGET, run, split, summary
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


class _PaddingSensitive:
    """A backend of ten layers whose every int8 layer costs a little cosine, more where the rows are padded to the
    longest of a whole batch of four (per-tensor activation ranges take the padding in) than in a trimmed half of two:
    the shape of what all-MiniLM-L6-v2 did on an AVX-512 VNNI CPU (0.995 passed on both halves, 0.99447 on the whole)."""

    candidates = [f"layer{i}" for i in range(10)]
    quantized: frozenset[str] = frozenset()
    tier = "fp32"

    def revert(self, kept: list[str]) -> frozenset[str]:
        return frozenset(kept)

    def op_type(self, layer: str) -> str:
        return "MatMul"

    def ranking(self, feeds: list) -> list[tuple[str, float]]:
        return [(name, 1.0 - i / 10) for i, name in enumerate(self.candidates)]

    def errors(self, reference: list, feeds: list) -> Callable[[frozenset[str]], np.ndarray]:
        per_layer = 0.0007 if len(feeds[0]["input_ids"]) == 4 else 0.0004
        return lambda kept: np.full(len(feeds), per_layer * (len(self.candidates) - len(kept)))

    def costs(self, model: frozenset[str], kept: list[str], feed: dict) -> dict:
        return {"layers": {}}


def test_the_fallback_keeps_layers_until_the_gate_passes_on_the_whole_batches_too() -> None:
    feeds = [_text_batch([3, 5, 2, 4], 5), _text_batch([1, 2, 3, 4], 4)]

    outcome = run("text", _PaddingSensitive(), feeds, lambda feed: {}, 0.995, 0.5, 60.0, lambda message: None)

    assert min(outcome.fully_quantized["search"], outcome.fully_quantized["held_out"]) >= 0.995 > outcome.fully_quantized["whole"]
    assert outcome.needed and outcome.passed
    # at least the 3 that the whole needs (7 int8 layers x 0.0007 = 0.0049), within the budget of 5: the search steers
    # by the search half's figures, so it may keep more than the fewest the whole needs, never fewer
    assert 3 <= len(outcome.kept) <= 5
    assert outcome.reached["held_out"] >= 0.995


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
