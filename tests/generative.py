"""Helpers for the generative families' tests (`test_smolvlm`, `test_gemma3`, `test_llava_next`, `test_qwen2_5_vl`):
the parts `convert` makes, a family's preprocessor for a model directory, transformers' greedy tokens beside vlmopt's
loop, and `quantize --part` with the gates off."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from click.testing import Result

from conftest import manifest, vlmopt, vlmopt_json
from vlmopt.samples import sample_image

#: the three parts `convert` writes for a generative family, by part name
PARTS = {"vision": "vision.onnx", "embedding": "embedding.onnx", "decoder": "decoder.onnx"}
#: two prompts of unequal length: a batch of both is left-padded
PROMPTS = ("Describe this image.", "What is in this picture, and what colour is it?")


def preprocessor_of(model_dir: Path) -> Any:
    """The preprocessor of the family the model directory's `hf` artifact was exported as."""
    from vlmopt.families import family_named

    family = family_named(manifest(model_dir)["artifacts"]["hf"]["traits"]["family"])
    return family.preprocessor(model_dir / "hf")


def greedy(model_dir: Path, prompts: list[str], images: list[Any], new_tokens: int = 16) -> tuple[list[list[int]], list[list[int]]]:
    """transformers' generate and vlmopt's ONNX Runtime loop on the same prompt (one image per prompt in a batch): (expected, got)."""
    from vlmopt.runners.generate import GenerateRequest, HfGenerateRunner, OrtGenerateRunner

    made = preprocessor_of(model_dir)
    prompt = made(prompts, images, images_per_prompt=[1] * len(prompts) if len(prompts) > 1 and images else None)
    request = GenerateRequest(prompt, new_tokens, made.eos_token_ids, made.pad_token_id, min_new_tokens=new_tokens)
    with HfGenerateRunner(model_dir / "hf", threads=1) as hf, OrtGenerateRunner(model_dir / "onnx", PARTS, threads=1, contract=made.contract) as ort:
        return hf.generate(request).tokens, ort.generate(request).tokens


#: the accuracy gates `quantize` would apply, off: random weights agree by chance only (the figures are still recorded)
GATES_OFF = ("--min-token-agreement", "off", "--max-ppl-increase", "off", "--min-cosine", "off")


def quantize_parts(source: Path, into: Path, gates_off: tuple[str, ...] = GATES_OFF) -> tuple[Path, str, dict[str, Any]]:
    """A copy of `source` in `into` quantized with `--part decoder=int4 --part vision=int8` and `gates_off`:
    (model dir, artifact name, its verification metrics by name)."""
    model_dir = Path(shutil.copytree(source, into / source.name))
    name = vlmopt_json("quantize", model_dir, "--part", "decoder=int4", "--part", "vision=int8", *gates_off)["artifact"]["name"]
    metrics = {m["name"]: m for m in manifest(model_dir)["artifacts"][name]["verification"]["metrics"]}
    return model_dir, name, metrics


def picture_file(folder: Path, seed: int, size: tuple[int, int]) -> Path:
    """`sample_image(seed)` resized to `size`, saved as a PNG in `folder`."""
    sample_image(seed).resize(size).save(path := folder / "picture.png")
    return path


def onnx_verification(model_dir: Path) -> tuple[dict[str, Any], set[str], dict[str, Any]]:
    """What `convert` recorded of the `onnx` artifact's verification: (the record, the parts checked against
    transformers' data, its metrics by name)."""
    verification = manifest(model_dir)["artifacts"]["onnx"]["verification"]
    against_transformers = {tower for tower, checks in verification["towers"].items() if any(c["data"] == "transformers" for c in checks)}
    return verification, against_transformers, {m["name"]: m for m in verification["metrics"]}


def export_with_config(source: Path, scratch: Path, edit: Callable[[dict[str, Any]], None]) -> tuple[Result, Path]:
    """`vlmopt export` of a copy of the checkpoint `source` whose config.json `edit` changed, into `scratch`/out:
    (the result, where its output would be)."""
    copy = Path(shutil.copytree(source, scratch / "source"))
    config = json.loads((copy / "config.json").read_text())
    edit(config)
    (copy / "config.json").write_text(json.dumps(config))
    return vlmopt("export", copy, "-o", scratch / "out"), scratch / "out"
