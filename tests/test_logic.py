"""The pure logic the stages rest on: output comparison, dummy inputs, content digests."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from vlmopt.errors import CheckFailed
from vlmopt.families import TensorSpec, TextVocab, Tower
from vlmopt.inputs import make_inputs
from vlmopt.records import Verification
from vlmopt.runners import Runner
from vlmopt.verification import Gates, compare, verify_runners
from vlmopt.verification.check import shape_sets
from vlmopt.workspace import content_digest, file_records

CLIP_LIKE = TextVocab(vocab_size=1024, max_length=32, bos_token_id=1022, eos_token_id=1023, pad_token_id=1023)


def _text_tower(vocab: TextVocab) -> Tower:
    return Tower(
        name="text",
        inputs=(
            TensorSpec("input_ids", ("batch", "sequence"), "int64", "input_ids"),
            TensorSpec("attention_mask", ("batch", "sequence"), "int64", "attention_mask"),
        ),
        outputs=(TensorSpec("text_embeds", ("batch", 16)),),
        wrap=lambda model: model,
        vocab=vocab,
    )


# -- compare ------------------------------------------------------------------------------------
def test_compare_of_identical_arrays_has_no_difference_and_cosine_one() -> None:
    a = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)

    result = compare("out", a, a.copy())

    assert result.max_abs_diff == 0.0
    assert result.cosine_min == pytest.approx(1.0)
    assert result.cosine_mean == pytest.approx(1.0)


def test_compare_of_orthogonal_rows_has_cosine_zero() -> None:
    reference = np.array([[1.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    candidate = np.array([[0.0, 3.0], [5.0, 0.0]], dtype=np.float32)

    result = compare("out", reference, candidate)

    assert result.cosine_min == pytest.approx(0.0)
    assert result.cosine_mean == pytest.approx(0.0)
    assert result.max_abs_diff == pytest.approx(5.0)


def test_compare_refuses_outputs_of_different_shapes() -> None:
    with pytest.raises(ValueError, match="shape"):
        compare("out", np.zeros((2, 3)), np.zeros((3, 2)))


# -- make_inputs --------------------------------------------------------------------------------
def test_dummy_attention_mask_rows_are_ones_then_zeros() -> None:
    mask = make_inputs(_text_tower(CLIP_LIKE), {"batch": 8, "sequence": 20})["attention_mask"]

    for row in mask:
        real = int(row.sum())
        assert real >= 1
        assert row.tolist() == [1] * real + [0] * (20 - real)


def test_dummy_text_first_row_fills_the_whole_sequence() -> None:
    mask = make_inputs(_text_tower(CLIP_LIKE), {"batch": 8, "sequence": 20})["attention_mask"]

    assert mask[0].tolist() == [1] * 20
    assert mask[1:].sum(axis=1).min() < 20


def test_dummy_text_starts_with_bos_and_ends_with_eos_at_the_last_real_position() -> None:
    feed = make_inputs(_text_tower(CLIP_LIKE), {"batch": 8, "sequence": 20})

    for ids, mask in zip(feed["input_ids"], feed["attention_mask"], strict=True):
        last = int(mask.sum()) - 1
        assert ids[0] == CLIP_LIKE.bos_token_id
        assert ids[last] == CLIP_LIKE.eos_token_id
        assert (ids[1:last] < 1022).all()


def test_dummy_token_ids_stay_inside_the_vocabulary_when_special_ids_do_not() -> None:
    siglip_like = TextVocab(vocab_size=1024, max_length=16, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)

    ids = make_inputs(_text_tower(siglip_like), {"batch": 4, "sequence": 16})["input_ids"]

    assert ids.min() >= 0
    assert ids.max() < 1024


def test_dummy_inputs_are_the_same_for_the_same_seed() -> None:
    tower = _text_tower(CLIP_LIKE)

    first, second = make_inputs(tower, {"batch": 3, "sequence": 9}, seed=4), make_inputs(tower, {"batch": 3, "sequence": 9}, seed=4)

    assert all(np.array_equal(first[k], second[k]) for k in first)


# -- verification ---------------------------------------------------------------------------------
def _embedding_tower() -> Tower:
    """A tower whose outputs the tests' reference/candidate functions compute directly."""
    return Tower(
        name="vision",
        inputs=(TensorSpec("pixel_values", ("batch", 3, 4, 4), "float32", "image"),),
        outputs=(TensorSpec("image_embeds", ("batch", 2)),),
        wrap=lambda model: model,
    )


class _FunctionRunner(Runner):
    """Our runner interface over a plain function (the verification service runs any backend)."""

    backend = "function"

    def __init__(self, function: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]):
        super().__init__(["pixel_values"], ["image_embeds"])
        self.function = function

    def run_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.function(feed)


def _verify(reference: Callable[..., dict[str, np.ndarray]], candidate: Callable[..., dict[str, np.ndarray]], gates: Gates) -> Verification:
    tower = _embedding_tower()
    return verify_runners(
        {"vision": tower},
        lambda t: _FunctionRunner(reference),
        lambda t: _FunctionRunner(candidate),
        gates,
        "reference",
        sets=lambda t: shape_sets(t, [{"batch": 1}, {"batch": 2}]),
    )


def test_verification_records_the_worst_cosine_over_all_shapes() -> None:
    def reference(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"image_embeds": np.tile([0.1, 0.0], (len(feed["pixel_values"]), 1))}

    def candidate(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # batch 1: far off but parallel (cosine 1); batch 2: close but orthogonal (cosine 0)
        row = [1.1, 0.0] if len(feed["pixel_values"]) == 1 else [0.0, 0.1]
        return {"image_embeds": np.tile(row, (len(feed["pixel_values"]), 1))}

    result = _verify(reference, candidate, Gates(atol=10.0))

    (check,) = result.towers["vision"]
    assert check.outputs["image_embeds"].max_abs_diff == pytest.approx(1.0)
    assert check.outputs["image_embeds"].worst_at == {"batch": 1}
    assert check.outputs["image_embeds"].cosine_min == pytest.approx(0.0)


def test_verification_fails_when_any_output_exceeds_atol() -> None:
    def reference(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"image_embeds": np.zeros((len(feed["pixel_values"]), 2), dtype=np.float32)}

    def candidate(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"image_embeds": np.full((len(feed["pixel_values"]), 2), 1e-3, dtype=np.float32)}

    with pytest.raises(CheckFailed) as raised:
        _verify(reference, candidate, Gates(atol=1e-4))

    assert raised.value.details["verification"]["passed"] is False
    assert "differs from the reference by 0.001 (> --atol 0.0001)" in raised.value.message


def test_verification_runs_the_whole_reference_before_any_candidate_loads() -> None:
    events: list[str] = []

    class Logged(_FunctionRunner):
        def __init__(self, side: str, tower: Tower):
            super().__init__(lambda feed: {"image_embeds": np.ones((len(feed["pixel_values"]), 2), np.float32)})
            self.side = f"{side} {tower.name}"
            events.append(f"open {self.side}")

        def close(self) -> None:
            events.append(f"close {self.side}")
            super().close()

    def extra() -> tuple[dict, list]:
        events.append("extra")
        return {}, []

    towers = {"vision": _embedding_tower(), "text": dataclasses.replace(_embedding_tower(), name="text")}
    sets = lambda t: shape_sets(t, [{"batch": 1}, {"batch": 2}])  # noqa: E731

    verify_runners(towers, lambda t: Logged("reference", t), lambda t: Logged("candidate", t), Gates(atol=1e-6), "reference", sets=sets, extra=extra)

    # a PyTorch model and its exported parts are never in memory together; a family's checks run in between
    assert events == [
        "open reference vision", "close reference vision", "open reference text", "close reference text",
        "extra",
        "open candidate vision", "close candidate vision", "open candidate text", "close candidate text",
    ]  # fmt: skip


# -- content digests ----------------------------------------------------------------------------
def _folder(root: Path, files: dict[str, bytes]) -> Path:
    root.mkdir()
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_content_digest_changes_when_a_file_changes(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "a", {"config.json": b"{}", "weights/model.bin": b"\x00\x01\x02"})
    before = content_digest(file_records(folder))

    (folder / "weights" / "model.bin").write_bytes(b"\x00\x01\x03")

    assert content_digest(file_records(folder)) != before


def test_content_digest_is_the_same_for_the_same_files_anywhere(tmp_path: Path) -> None:
    files = {"config.json": b"{}", "weights/model.bin": b"\x00\x01\x02"}

    first, second = _folder(tmp_path / "a", files), _folder(tmp_path / "b", files)

    assert content_digest(file_records(first)) == content_digest(file_records(second))
