"""benchmarks/anchors.py's fidelity measure: the same agreement, KL and perplexity for every runtime's logits."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def anchors():
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("anchors", BENCHMARKS / "anchors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def windows_and_logits(seed: int = 0, vocab: int = 7) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    windows = [rng.integers(0, vocab, 9) for _ in range(3)]
    return windows, [rng.standard_normal((9, vocab)).astype(np.float32) * 3 for _ in windows]


def test_the_reference_against_itself_agrees_everywhere_with_no_divergence(anchors, tmp_path: Path) -> None:
    windows, logits = windows_and_logits()
    fidelity = anchors.Fidelity(windows, logits.__getitem__, 7, tmp_path)
    found = fidelity(logits.__getitem__)
    assert found["top1_agreement"] == 1.0
    assert found["kl"] == pytest.approx(0.0, abs=1e-6)
    assert found["ppl_increase"] == pytest.approx(0.0, abs=1e-6)
    assert found["positions"] == 3 * 8


def test_kl_agreement_and_perplexity_are_those_computed_by_hand(anchors, tmp_path: Path) -> None:
    windows, reference = windows_and_logits(0)
    _, contender = windows_and_logits(1)
    found = anchors.Fidelity(windows, reference.__getitem__, 7, tmp_path)(contender.__getitem__)

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x[:-1].astype(np.float64)
        return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)

    p = [log_softmax(r) for r in reference]
    q = [log_softmax(c) for c in contender]
    kl = np.concatenate([(np.exp(a) * (a - b)).sum(-1) for a, b in zip(p, q, strict=True)]).mean()
    agree = np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(p, q, strict=True)]).mean()
    nll = [np.concatenate([-lp[np.arange(8), w[1:]] for lp, w in zip(side, windows, strict=True)]).mean() for side in (p, q)]
    assert found["kl"] == pytest.approx(kl, rel=1e-4)
    assert found["top1_agreement"] == pytest.approx(agree)
    assert found["ppl_increase"] == pytest.approx(np.exp(nll[1]) / np.exp(nll[0]) - 1, rel=1e-4)


def test_rows_past_the_shared_vocabulary_are_left_out_of_every_measure(anchors, tmp_path: Path) -> None:
    """The fp32 decoder's vocabulary padded for `<image>` (rows llama.cpp does not have) must not count."""
    windows, logits = windows_and_logits()
    padded = [np.concatenate([x, np.full((9, 2), 50.0, np.float32)], axis=1) for x in logits]
    fidelity = anchors.Fidelity(windows, padded.__getitem__, 7, tmp_path)
    found = fidelity(logits.__getitem__)
    assert fidelity.vocab == 7
    assert found["top1_agreement"] == 1.0
    assert found["kl"] == pytest.approx(0.0, abs=1e-6)
