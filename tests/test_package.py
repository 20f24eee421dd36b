"""`vlmopt package --triton`: the repository it writes (checked against Triton's schema), how it chooses, and what it refuses.

The onnxruntime, OpenVINO and TensorRT flavours cannot be loaded by any server here: they are checked against Triton's
model-configuration schema. The python flavour is served by a real Triton server in test_package_triton_server.py.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import text_format

from conftest import assert_refused, manifest, snapshot, vlmopt, vlmopt_json
from vlmopt.engines import Profile, derive_profiles, engine_metadata
from vlmopt.records import TowerRecord
from vlmopt.triton.config import TRITON_IMAGE, TRITON_RELEASE, model_config_pb2
from vlmopt.workspace import ModelDir, StageOutput


def read_config(path: Path) -> Any:
    """A config.pbtxt parsed with Triton's own schema (a field it does not know raises)."""
    return text_format.Parse(path.read_text(), model_config_pb2().ModelConfig())


def configs(repo: Path) -> dict[str, Any]:
    return {p.parent.name: read_config(p) for p in sorted(repo.glob("*/config.pbtxt"))}


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory, converted: Callable[[str], Path]) -> Path:
    """A tiny CLIP with hf, onnx and a fused onnx-opt."""
    model_dir = tmp_path_factory.mktemp("package") / "clip"
    shutil.copytree(converted("clip"), model_dir)
    assert vlmopt("optimize", model_dir).exit_code == 0
    return model_dir


@pytest.fixture(scope="module")
def onnx_repo(clip: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("repos") / "triton"
    result = vlmopt("package", clip, "--triton", out, "onnx", "--threads", "2")
    assert result.exit_code == 0, result.output
    return out


def add_engine_artifact(model_dir: Path, name: str, profiles_of: Callable[[Any], dict[str, Profile]]) -> None:
    """A TensorRT artifact recorded as `vlmopt build` records one: per tower an engine file and its optimization profiles.
    No engine can be built on this machine (no GPU, no full TensorRT), so the file holds placeholder bytes: `package`
    copies engines and writes their configs from the profiles, and never loads them."""
    home = ModelDir.open(model_dir)
    parent = home.artifact("onnx")

    def build(tmp: Path) -> StageOutput:
        towers = {}
        for tower, record in parent.towers.items():
            (tmp / f"{tower}.engine").write_bytes(b"placeholder engine")
            meta = engine_metadata("10.13.0", "NVIDIA H100", (9, 0), profiles_of(record.tower), source="onnx")
            towers[tower] = TowerRecord(record.tower, f"{tower}.engine", 18, engine=meta)
        return StageOutput(towers=towers, traits=parent.traits.derive(target="tensorrt"))

    with home.lock():
        home.produce(name, kind="tensorrt", stage="build", options={}, parent=parent, build=build)


# -- what it writes --------------------------------------------------------------------------------------------
def test_package_writes_a_model_per_tower_and_an_ensemble_taking_raw_data(onnx_repo: Path) -> None:
    found = configs(onnx_repo)

    assert found["clip_vision_onnxruntime"].platform == "onnxruntime_onnx"
    assert found["clip_text_onnxruntime"].platform == "onnxruntime_onnx"
    assert found["clip_vision"].platform == "ensemble" and found["clip_text"].platform == "ensemble"
    assert [i.data_type for i in found["clip_vision"].input] == [model_config_pb2().TYPE_STRING]
    assert [s.model_name for s in found["clip_vision"].ensemble_scheduling.step] == ["clip_vision_preprocess", "clip_vision_onnxruntime", "clip_normalize"]
    assert (onnx_repo / "clip_vision_onnxruntime" / "1" / "model.onnx").is_file()
    assert (onnx_repo / "clip_vision_preprocess" / "1" / "processor" / "preprocessor_config.json").is_file()
    assert (onnx_repo / "clip_text_preprocess" / "1" / "processor" / "tokenizer.json").is_file()
    assert (onnx_repo / "clip_vision" / "1").is_dir()


def test_onnx_dims_are_minus_one_where_the_graph_axis_is_free_and_the_batch_axis_is_max_batch_size(onnx_repo: Path) -> None:
    text = configs(onnx_repo)["clip_text_onnxruntime"]

    assert text.max_batch_size == 8
    assert [(i.name, list(i.dims)) for i in text.input] == [("input_ids", [-1]), ("attention_mask", [-1])]
    assert [list(o.dims) for o in text.output] == [[16]]


def test_tower_models_batch_dynamically_on_cpu_with_the_backends_thread_parameters(onnx_repo: Path) -> None:
    vision = configs(onnx_repo)["clip_vision_onnxruntime"]

    assert vision.HasField("dynamic_batching")
    assert [(g.kind, g.count) for g in vision.instance_group] == [(model_config_pb2().ModelInstanceGroup.KIND_CPU, 1)]
    assert vision.parameters["intra_op_thread_count"].string_value == "2"


def test_text_preprocessing_pads_to_the_towers_length_so_requests_batch(onnx_repo: Path) -> None:
    tokenize = configs(onnx_repo)["clip_text_preprocess"]

    assert tokenize.backend == "python"
    assert [list(o.dims) for o in tokenize.output] == [[32], [32]]
    assert tokenize.parameters["max_length"].string_value == "32"


def test_a_misspelt_field_is_refused_by_the_schema_check() -> None:
    from vlmopt.errors import VlmoptError
    from vlmopt.triton.config import parse

    with pytest.raises(VlmoptError, match="max_batch_sise"):
        parse('name: "x"\nmax_batch_sise: 8\n', "x/config.pbtxt")


def test_the_repository_is_recorded_in_the_manifest_with_its_files(clip: Path, onnx_repo: Path) -> None:
    entry = manifest(clip)["packages"][str(onnx_repo.resolve())]

    assert entry["towers"]["vision"]["artifact"] == "onnx"
    assert entry["triton_release"] == TRITON_RELEASE
    assert {f["path"] for f in entry["files"]} >= {"clip_vision/config.pbtxt", "clip_vision_onnxruntime/1/model.onnx", "README.md", "Dockerfile"}


def test_the_record_survives_a_later_stage_committing_into_the_directory(clip: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "clip"
    shutil.copytree(clip, model_dir)
    out = tmp_path / "triton"
    assert vlmopt("package", model_dir, "--triton", out, "onnx").exit_code == 0

    assert vlmopt("optimize", model_dir, "--name", "onnx-opt2").exit_code == 0

    assert str(out.resolve()) in manifest(model_dir)["packages"]


def test_a_rerun_with_the_same_artifacts_and_options_is_up_to_date(clip: Path, onnx_repo: Path) -> None:
    before = snapshot(onnx_repo)

    payload = vlmopt_json("package", clip, "--triton", onnx_repo, "onnx", "--threads", "2")

    assert payload["skipped"] is True
    assert snapshot(onnx_repo) == before


def test_its_own_untouched_repository_is_remade_without_force_when_the_options_change(clip: Path, tmp_path: Path) -> None:
    out = tmp_path / "triton"
    assert vlmopt("package", clip, "--triton", out, "onnx").exit_code == 0

    result = vlmopt("package", clip, "--triton", out, "onnx", "--max-batch", "4")

    assert result.exit_code == 0, result.output
    assert configs(out)["clip_vision_onnxruntime"].max_batch_size == 4


def test_its_own_repository_edited_since_is_not_replaced_without_force(clip: Path, tmp_path: Path) -> None:
    out = tmp_path / "triton"
    assert vlmopt("package", clip, "--triton", out, "onnx").exit_code == 0
    (out / "clip_vision" / "notes.txt").write_text("mine")

    assert_package_refused(clip, out, "onnx", "--max-batch", "4", fragments=("is a non-empty folder", "--force"))


def test_a_classifier_returns_its_logits_without_a_normalization_step(converted: Callable[[str], Path], tmp_path: Path) -> None:
    out = tmp_path / "triton"

    result = vlmopt("package", converted("vit-classifier"), "--triton", out, "onnx", "--model-name", "vit")

    assert result.exit_code == 0, result.output
    found = configs(out)
    assert [s.model_name for s in found["vit_vision"].ensemble_scheduling.step] == ["vit_vision_preprocess", "vit_vision_onnxruntime"]
    assert [(o.name, list(o.dims)) for o in found["vit_vision"].output] == [("logits", [5])]
    assert "vit_normalize" not in found


def test_force_replaces_an_existing_repository(clip: Path, tmp_path: Path) -> None:
    out = tmp_path / "triton"
    out.mkdir()
    (out / "stale.txt").write_text("old")

    result = vlmopt("package", clip, "--triton", out, "onnx", "--force")

    assert result.exit_code == 0, result.output
    assert not (out / "stale.txt").exists()
    assert (out / "clip_vision" / "config.pbtxt").is_file()


def test_the_dockerfile_starts_from_the_triton_release_the_readme_names(onnx_repo: Path) -> None:
    from dockerfile_parse import DockerfileParser

    parser = DockerfileParser(str(onnx_repo / "Dockerfile"))

    assert parser.baseimage == TRITON_IMAGE
    instructions = [(i["instruction"], i["value"]) for i in parser.structure]
    assert ("COPY", ". /models") in instructions
    assert any(kind == "CMD" and "--model-repository=/models" in value for kind, value in instructions)
    assert any(kind == "RUN" and "numpy<2" in value and "transformers==" in value for kind, value in instructions)
    assert TRITON_IMAGE in (onnx_repo / "README.md").read_text()


def test_the_readme_gives_the_server_command_a_curl_request_and_a_client_example(onnx_repo: Path) -> None:
    readme = (onnx_repo / "README.md").read_text()

    assert "tritonserver --model-repository=/models" in readme
    assert "curl -s localhost:8000/v2/models/clip_text/infer" in readme
    assert 'client.infer("clip_vision", [data])' in readme
    assert "`pixel_values` FP32 [3, 32, 32]" in readme


def test_the_python_api_writes_the_same_repository(clip: Path, tmp_path: Path) -> None:
    import vlmopt as api

    result = api.package(clip, tmp_path / "triton", "onnx", max_batch=2)

    assert result.towers["text"]["artifact"] == "onnx" and "clip_text" in result.models
    assert configs(tmp_path / "triton")["clip_text_onnxruntime"].max_batch_size == 2


# -- the other flavours, against the schema ---------------------------------------------------------------------
def test_an_openvino_ir_is_served_by_the_openvino_backend(clip: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "clip"
    shutil.copytree(clip, model_dir)
    assert vlmopt("openvino", model_dir).exit_code == 0
    out = tmp_path / "triton"

    result = vlmopt("package", model_dir, "--triton", out, "openvino", "--threads", "2")

    assert result.exit_code == 0, result.output
    vision = configs(out)["clip_vision_openvino"]
    assert vision.backend == "openvino" and vision.default_model_filename == "model.xml"
    assert vision.parameters["INFERENCE_NUM_THREADS"].string_value == "2"
    assert (out / "clip_vision_openvino" / "1" / "model.xml").is_file() and (out / "clip_vision_openvino" / "1" / "model.bin").is_file()


def test_an_unfused_onnx_graph_can_go_to_the_openvino_backend(clip: Path, tmp_path: Path) -> None:
    out = tmp_path / "triton"

    result = vlmopt("package", clip, "--triton", out, "onnx", "--onnx-backend", "openvino")

    assert result.exit_code == 0, result.output
    vision = configs(out)["clip_vision_openvino"]
    assert vision.backend == "openvino" and vision.default_model_filename == "model.onnx"


def test_a_tensorrt_engine_gets_tensorrt_plan_on_gpu_with_dims_from_its_profiles(clip: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "clip"
    shutil.copytree(clip, model_dir)
    add_engine_artifact(model_dir, "trt", lambda tower: derive_profiles(tower, 4, 16, None))
    out = tmp_path / "triton"

    result = vlmopt("package", model_dir, "--triton", out, "trt")

    assert result.exit_code == 0, result.output
    text = configs(out)["clip_text_tensorrt"]
    assert text.platform == "tensorrt_plan" and text.default_model_filename == "model.plan"
    assert text.max_batch_size == 16
    assert [list(i.dims) for i in text.input] == [[-1], [-1]]
    assert [g.kind for g in text.instance_group] == [model_config_pb2().ModelInstanceGroup.KIND_GPU]
    assert list(configs(out)["clip_vision_tensorrt"].input[0].dims) == [3, 32, 32]
    assert (out / "clip_text_tensorrt" / "1" / "model.plan").read_bytes() == b"placeholder engine"


# -- choosing the artifacts -------------------------------------------------------------------------------------
def test_by_default_the_bench_recommendation_is_packaged_and_the_reason_said(clip: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "clip"
    shutil.copytree(clip, model_dir)
    assert vlmopt("bench", model_dir, "onnx", "--batch", "1,4", "--iterations", "2", "--warmup", "0").exit_code == 0
    out = tmp_path / "triton"

    payload = vlmopt_json("package", model_dir, "--triton", out)

    vision = payload["towers"]["vision"]
    assert vision["artifact"] == "onnx"
    assert "the fastest that passed its gate at batch 4" in vision["reason"]
    assert vision["max_batch_size"] == 4
    assert configs(out)["clip_vision_onnxruntime"].max_batch_size == 4


def test_tower_equals_artifact_picks_one_artifact_per_tower(clip: Path, tmp_path: Path) -> None:
    out = tmp_path / "triton"

    payload = vlmopt_json("package", clip, "--triton", out, "vision=onnx-opt", "text=onnx")

    assert {t: e["artifact"] for t, e in payload["towers"].items()} == {"vision": "onnx-opt", "text": "onnx"}


# -- bad input: one line, exit 2, nothing written ---------------------------------------------------------------
def assert_package_refused(model_dir: Path, out: Path, *args: object, fragments: tuple[str, ...]) -> None:
    existed = snapshot(out) if out.exists() else None
    assert_refused(model_dir, "package", "--triton", out, *args, fragments=fragments)
    assert (snapshot(out) if out.exists() else None) == existed
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_no_bench_and_no_artifact_named_is_refused(clip: Path, tmp_path: Path) -> None:
    assert_package_refused(clip, tmp_path / "triton", fragments=("no bench has chosen an artifact", "vlmopt bench"))


def test_a_hugging_face_artifact_is_refused(clip: Path, tmp_path: Path) -> None:
    assert_package_refused(clip, tmp_path / "triton", "hf", fragments=("'hf' is a Hugging Face checkpoint",))


def test_an_ort_fused_graph_is_refused_for_the_openvino_backend(clip: Path, tmp_path: Path) -> None:
    assert_package_refused(clip, tmp_path / "triton", "onnx-opt", "--onnx-backend", "openvino", fragments=("fused by ONNX Runtime", "OpenVINO backend"))


def test_a_missing_tokenizer_is_refused(clip: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "clip"
    shutil.copytree(clip, model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
        (model_dir / "hf" / name).unlink(missing_ok=True)

    assert_package_refused(model_dir, tmp_path / "triton", "onnx", fragments=("text tower's pre-processing needs the model's tokenizer",))


def test_a_missing_image_processor_is_refused(clip: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "clip"
    shutil.copytree(clip, model_dir)
    for name in ("preprocessor_config.json", "processor_config.json"):
        (model_dir / "hf" / name).unlink(missing_ok=True)

    assert_package_refused(model_dir, tmp_path / "triton", "onnx", fragments=("vision tower's pre-processing needs the model's image processor",))


def test_an_existing_non_empty_output_without_force_is_refused(clip: Path, tmp_path: Path) -> None:
    out = tmp_path / "triton"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")

    assert_package_refused(clip, out, "onnx", fragments=("is a non-empty folder", "--force"))
    assert (out / "mine.txt").read_text() == "keep me"


def test_an_engine_whose_profile_lacks_a_batch_axis_is_refused(clip: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "clip"
    shutil.copytree(clip, model_dir)

    def fixed_batch(tower: Any) -> dict[str, Profile]:
        profiles = derive_profiles(tower, 4, 4, None)
        return {name: Profile((4, *p.min[1:]), p.opt, p.max) for name, p in profiles.items()}

    add_engine_artifact(model_dir, "trt-fixed", fixed_batch)

    assert_package_refused(model_dir, tmp_path / "triton", "trt-fixed", fragments=("has no batch axis from 1", "vlmopt build"))


def test_a_static_batch_graph_is_refused(static_clip: Path, tmp_path: Path) -> None:
    assert_package_refused(static_clip, tmp_path / "triton", "onnx", fragments=("fixed batch of 2", "dynamic batcher"))


def test_a_one_graph_monolith_is_refused(exported: Callable[[str], Path], tmp_path: Path) -> None:
    model_dir = tmp_path / "clip"
    shutil.copytree(exported("clip"), model_dir)
    assert vlmopt("convert", model_dir, "--monolith", "--name", "onnx-monolith").exit_code == 0

    assert_package_refused(model_dir, tmp_path / "triton", "onnx-monolith", fragments=("one graph of both towers", "without --monolith"))


def test_an_output_inside_an_artifact_is_refused(clip: Path) -> None:
    assert_package_refused(clip, clip / "onnx" / "triton", "onnx", fragments=("one of its artifacts",))


def test_a_tower_named_twice_is_refused(clip: Path, tmp_path: Path) -> None:
    assert_package_refused(clip, tmp_path / "triton", "onnx", "vision=onnx-opt", fragments=("the vision tower is named twice",))


def test_json_reports_a_refusal_as_one_object(clip: Path, tmp_path: Path) -> None:
    result = vlmopt("package", clip, "--triton", tmp_path / "triton", "hf", "--json")

    assert result.exit_code == 2
    assert json.loads(result.stdout)["ok"] is False
