"""Dummy inputs shaped like real ones, for export, verification and benchmarks."""

from __future__ import annotations

import numpy as np

from vlmopt.families.base import TensorSpec, TextVocab, Tower


def resolve_shape(spec: TensorSpec, sizes: dict[str, int]) -> tuple[int, ...]:
    shape = []
    for axis in spec.shape:
        if isinstance(axis, str):
            if axis not in sizes:
                raise KeyError(f"no size given for axis '{axis}' of input '{spec.name}'")
            shape.append(int(sizes[axis]))
        else:
            shape.append(int(axis))
    return tuple(shape)


def _in_vocab(token: int | None, vocab: TextVocab) -> int | None:
    """Configs carry defaults from other models (SigLIP's are CLIP's 49406/49407); ignore ids the vocabulary lacks."""
    return token if token is not None and 0 <= token < vocab.vocab_size else None


def _token_range(vocab: TextVocab) -> tuple[int, int]:
    """Ordinary (non-special) token ids: below the lowest special id that sits high in the vocabulary."""
    specials = [t for t in (_in_vocab(vocab.bos_token_id, vocab), _in_vocab(vocab.eos_token_id, vocab), _in_vocab(vocab.pad_token_id, vocab)) if t is not None]
    low = max([t for t in specials if t < 16] + [-1]) + 1
    high_specials = [t for t in specials if t >= 16]
    high = min(high_specials + [vocab.vocab_size])
    return low, max(high, low + 1)


def _text(vocab: TextVocab, batch: int, length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """input_ids and attention_mask: the first row fills `length`, the others are shorter and padded."""
    low, high = _token_range(vocab)
    lengths = np.full(batch, length)
    if batch > 1 and length > 2:
        lengths[1:] = rng.integers(max(2, length // 2), length + 1, size=batch - 1)
    ids = rng.integers(low, high, size=(batch, length), dtype=np.int64)
    mask = np.zeros((batch, length), dtype=np.int64)
    bos, eos, pad = (_in_vocab(t, vocab) for t in (vocab.bos_token_id, vocab.eos_token_id, vocab.pad_token_id))
    pad = pad if pad is not None else (eos or 0)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        ids[row, n:] = pad
        if bos is not None:
            ids[row, 0] = bos
        if eos is not None:
            ids[row, n - 1] = eos
    return ids, mask


def make_inputs(tower: Tower, sizes: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """A feed for `tower` with dynamic axes set from `sizes` (e.g. {"batch": 8, "sequence": 77})."""
    rng = np.random.default_rng(seed)
    feed: dict[str, np.ndarray] = {}
    text: tuple[np.ndarray, np.ndarray] | None = None
    for spec in tower.inputs:
        shape = resolve_shape(spec, sizes)
        if spec.role == "image":
            feed[spec.name] = rng.standard_normal(shape, dtype=np.float32)
        elif spec.role in ("input_ids", "attention_mask"):
            if text is None:
                assert tower.vocab is not None, f"tower {tower.name} has text inputs but no vocabulary"
                text = _text(tower.vocab, shape[0], shape[1], rng)
            feed[spec.name] = text[0] if spec.role == "input_ids" else text[1]
        elif spec.role == "token_type_ids":
            feed[spec.name] = np.zeros(shape, dtype=np.int64)
        else:
            raise ValueError(f"no generator for input role '{spec.role}'")
    return feed


def verification_sizes(tower: Tower) -> list[dict[str, int]]:
    """Two or more shapes that differ in every dynamic axis, inside the model's limits."""
    max_seq = tower.vocab.max_length if tower.vocab else 16
    small = {"batch": 1, "image_batch": 1, "text_batch": 2, "sequence": min(7, max_seq)}
    large = {"batch": 3, "image_batch": 3, "text_batch": 4, "sequence": min(23, max_seq)}
    return [small, large]


def export_sizes(tower: Tower) -> dict[str, int]:
    """Example sizes for tracing: at least 2 on every dynamic axis, so none is specialised to 1."""
    max_seq = tower.vocab.max_length if tower.vocab else 16
    return {"batch": 2, "image_batch": 2, "text_batch": 3, "sequence": min(16, max_seq)}
