"""`vlmopt export`: a local checkpoint saved as the `hf` artifact, recorded in the manifest, redone only when needed."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

from conftest import manifest, vlmopt, vlmopt_json


def test_export_writes_safetensors_config_and_tokenizer_into_hf(exported: Callable[[str], Path]) -> None:
    hf = exported("clip") / "hf"

    names = {p.name for p in hf.iterdir()}

    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= names


def test_export_manifest_has_the_schema_version(exported: Callable[[str], Path]) -> None:
    assert manifest(exported("clip"))["schema_version"] == 2


def test_export_manifest_records_the_hash_and_size_of_every_file(exported: Callable[[str], Path]) -> None:
    model_dir = exported("clip")
    files = manifest(model_dir)["artifacts"]["hf"]["files"]

    on_disk = sorted(p.relative_to(model_dir / "hf").as_posix() for p in (model_dir / "hf").rglob("*") if p.is_file())
    assert sorted(f["path"] for f in files) == on_disk
    for record in files:
        data = (model_dir / "hf" / record["path"]).read_bytes()
        assert record["sha256"] == hashlib.sha256(data).hexdigest()
        assert record["size"] == len(data)


def test_export_manifest_records_stage_source_and_tool_versions(exported: Callable[[str], Path], demo_source: Callable[[str], Path]) -> None:
    hf = manifest(exported("clip"))["artifacts"]["hf"]

    assert hf["stage"] == "export"
    assert hf["kind"] == "hf"
    assert hf["options"]["source"] == str(demo_source("clip").resolve())
    assert {"torch", "transformers", "onnx", "onnxruntime"} <= set(hf["tools"])


def test_export_rerun_with_the_same_source_is_skipped(
    exported: Callable[[str], Path], demo_source: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]
) -> None:
    model_dir = copy_model_dir(exported("clip"))
    before = (model_dir / "vlmopt.json").read_bytes()

    report = vlmopt_json("export", demo_source("clip"), "-o", model_dir)

    assert report["skipped"] is True
    assert (model_dir / "vlmopt.json").read_bytes() == before


def test_export_with_force_redoes_an_up_to_date_export(
    exported: Callable[[str], Path], demo_source: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]
) -> None:
    model_dir = copy_model_dir(exported("clip"))

    report = vlmopt_json("export", demo_source("clip"), "-o", model_dir, "--force")

    assert report["skipped"] is False
    assert manifest(model_dir)["artifacts"]["hf"]["stage"] == "export"


def test_export_redoes_a_source_whose_weights_changed(demo_source: Callable[[str], Path], retrained_clip_source: Path, tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(demo_source("clip"), source)
    model_dir = tmp_path / "model"
    vlmopt_json("export", source, "-o", model_dir)
    old_weights = (model_dir / "hf" / "model.safetensors").read_bytes()
    shutil.copy2(retrained_clip_source / "model.safetensors", source / "model.safetensors")

    report = vlmopt_json("export", source, "-o", model_dir)

    assert report["skipped"] is False
    assert (model_dir / "hf" / "model.safetensors").read_bytes() != old_weights


def test_a_failed_export_into_a_new_folder_leaves_no_folder_behind(demo_source: Callable[[str], Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(demo_source("clip"), broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file" * 10)
    model_dir = tmp_path / "model"

    result = vlmopt("export", broken, "-o", model_dir)

    assert result.exit_code == 2, result.output
    assert not model_dir.exists()


def test_a_failed_export_into_a_new_folder_does_not_block_the_retry(demo_source: Callable[[str], Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(demo_source("clip"), broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file" * 10)
    model_dir = tmp_path / "model"
    assert vlmopt("export", broken, "-o", model_dir).exit_code == 2

    result = vlmopt("export", demo_source("clip"), "-o", model_dir)

    assert result.exit_code == 0, result.stderr
    assert (model_dir / "hf" / "model.safetensors").is_file()
