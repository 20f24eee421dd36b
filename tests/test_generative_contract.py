"""The generative contract: families declare their parts and Hugging Face paths; the generation code reads them."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def llava(converted: Callable[[str], Path]) -> Path:
    return converted("llava")


SOURCE = Path(__file__).resolve().parents[1] / "src" / "vlmopt"
#: the modules that run, verify, configure and make generative parts: they read the family's contract
GENERATION_MODULES = ("runners/generate.py", "runners/genai.py", "verification/generation.py", "genai_builder.py", "stages/convert.py", "generation.py")
#: Hugging Face attributes of a VLM (reached any way but through a family's reference methods)
HF_PATHS = re.compile(r"get_image_features|multi_modal_projector|vision_tower|(?<!family)\.(language_model|lm_head|text_config)\b")
PART_LITERALS = re.compile(r"""["'](vision|embedding|decoder)["']""")


def _outside_families() -> list[Path]:
    return [p for p in SOURCE.rglob("*.py") if "families" not in p.relative_to(SOURCE).parts]


def test_no_module_outside_families_names_a_hugging_face_path_of_a_generative_model() -> None:
    found = [
        f"{p.relative_to(SOURCE)}:{n}: {line.strip()}"
        for p in _outside_families()
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if HF_PATHS.search(line)
    ]

    assert found == []


def test_the_generation_modules_name_no_part_themselves() -> None:
    found = [
        f"{name}:{n}: {line.strip()}"
        for name in GENERATION_MODULES
        for n, line in enumerate((SOURCE / name).read_text().splitlines(), 1)
        if PART_LITERALS.search(line)
    ]

    assert found == []


def test_no_family_imports_from_the_layers_above_it() -> None:
    upward = re.compile(r"from vlmopt\.(runners|stages|verification|generation|cli)\b|import vlmopt\.(runners|stages|verification)")
    found = [f"{p.name}:{n}" for p in (SOURCE / "families").glob("*.py") for n, line in enumerate(p.read_text().splitlines(), 1) if upward.search(line)]

    assert found == []


def test_llava_declares_three_parts_1d_positions_a_self_attention_cache_and_genai_phi3v() -> None:
    from vlmopt.families import family_named

    contract = family_named("llava").contract

    assert contract.part_names == ("vision", "embedding", "decoder")
    assert (contract.positions, contract.cache, contract.genai_model_type, contract.vision_inputs) == ("1d", "self-attention", "phi3v", ())


def test_the_loop_finds_the_parts_by_the_names_the_contract_gives_them(llava: Path, tmp_path: Path) -> None:
    from vlmopt.families.generative import GenerativeContract, Part
    from vlmopt.families.llava import LlavaPreprocessor
    from vlmopt.runners.generate import GenerateRequest, OrtGenerateRunner
    from vlmopt.samples import sample_image

    renamed = tmp_path / "renamed"
    shutil.copytree(llava / "onnx", renamed)
    default = GenerativeContract()
    contract = GenerativeContract(
        vision=Part("image_encoder", default.vision.takes, default.vision.gives),
        embedding=Part("token_embedder", default.embedding.takes, default.embedding.gives),
        decoder=Part("text_decoder", default.decoder.takes, default.decoder.gives),
    )
    preprocessor = LlavaPreprocessor(llava / "hf")
    request = GenerateRequest(preprocessor("Describe the picture.", [sample_image(3)]), 6, [], preprocessor.pad_token_id)
    files = {"vision": "vision.onnx", "embedding": "embedding.onnx", "decoder": "decoder.onnx"}

    with OrtGenerateRunner(llava / "onnx", files, threads=1) as plain:
        expected = plain.generate(request).tokens
    renamed_files = dict(zip(contract.part_names, files.values(), strict=True))
    with OrtGenerateRunner(renamed, renamed_files, threads=1, contract=contract) as runner:
        assert runner.generate(request).tokens == expected


@pytest.mark.parametrize(("field", "value"), [("positions", "mrope"), ("cache", "self-and-cross-attention")])
def test_the_loop_refuses_a_contract_it_cannot_run_in_one_line(llava: Path, field: str, value: str) -> None:
    from vlmopt.errors import VlmoptError
    from vlmopt.families.generative import GenerativeContract
    from vlmopt.runners.generate import OrtParts

    files = {"vision": "vision.onnx", "embedding": "embedding.onnx", "decoder": "decoder.onnx"}
    with pytest.raises(VlmoptError, match=value) as raised:
        OrtParts(llava / "onnx", files, threads=1, contract=GenerativeContract(**{field: value}))

    assert "\n" not in str(raised.value)
