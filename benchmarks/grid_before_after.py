"""`grid` of an earlier vlmopt against this one's on the same decoder, scored by the gate's measure in one process.

  git show 5e45d9b:src/vlmopt/quantization/int4.py > build/old_int4.py
  python benchmarks/grid_before_after.py --model-dir build/smol-lm --old-int4 build/old_int4.py

Prints the top-1 agreement and perplexity increase of both (against the fp32 decoder, on the first 2048 tokens of the
built-in text, windows of 256, accuracy level 4) and the forms this grid chose. A benchmark reports; it does not gate.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--old-int4", type=Path, required=True, help="an earlier src/vlmopt/quantization/int4.py")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    spec = importlib.util.spec_from_file_location("old_int4", args.old_int4)
    assert spec and spec.loader
    old = importlib.util.module_from_spec(spec)
    sys.modules["old_int4"] = old
    spec.loader.exec_module(old)

    from vlmopt import graph
    from vlmopt.families import family_named
    from vlmopt.quantization import int4
    from vlmopt.runners.generate import ort_session
    from vlmopt.samples import text_tokens
    from vlmopt.verification.generation import TEXT_TOKENS, WINDOW
    from vlmopt.workspace import ModelDir

    directory = ModelDir(args.model_dir)
    record = directory.load()["onnx"]
    folder = directory.artifact_path("onnx")
    files = {name: tower.file for name, tower in record.towers.items()}
    preprocessor = family_named(record.traits.family).preprocessor(directory.checkpoint_folder(record))
    print(f"load average {os.getloadavg()}", flush=True)
    fp32 = graph.load(folder / files["decoder"])
    del fp32.graph.value_info[:]
    embedding = ort_session(folder / files["embedding"], args.threads)
    reference = ort_session(folder / files["decoder"], args.threads)
    ids, _ = text_tokens(preprocessor.tokenizer, TEXT_TOKENS)
    scorer = int4.TokenScorer(embedding, reference, ids, min(WINDOW, preprocessor.max_positions, len(ids)), args.threads)
    print(f"old grid ({args.old_int4}): {scorer(old.grid(fp32, old.Settings(threads=args.threads)))}", flush=True)
    plan = int4.grid_plan(fp32, int4.Settings(threads=args.threads))
    print(f"this grid's forms: {int4.grid_summary(plan)['forms']}", flush=True)
    print(f"this grid: {scorer(int4.grid(fp32, int4.Settings(threads=args.threads), plan=plan))}", flush=True)
    print(f"load average {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
