"""`vlmopt convert`: one ONNX graph per tower with named dynamic axes, verified against PyTorch."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import TOWERS, family_params, manifest, snapshot, vlmopt, vlmopt_json
from vlmopt.demo import build_demo_model

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _feed(session: ort.InferenceSession, batch: int, sequence: int, image_batch: int | None = None) -> dict[str, np.ndarray]:
    """Real-looking inputs for any graph input: images, token ids with a padded row, masks."""
    rng = np.random.default_rng(7)
    feed = {}
    for spec in session.get_inputs():
        if spec.name == "pixel_values":
            _, channels, height, width = spec.shape
            feed[spec.name] = rng.standard_normal((image_batch or batch, channels, height, width), dtype=np.float32)
        elif spec.name == "input_ids":
            feed[spec.name] = rng.integers(1, 100, size=(batch, sequence), dtype=np.int64)
        elif spec.name == "attention_mask":
            mask = np.ones((batch, sequence), dtype=np.int64)
            mask[-1, sequence // 2 :] = 0
            feed[spec.name] = mask
        elif spec.name == "token_type_ids":
            feed[spec.name] = np.zeros((batch, sequence), dtype=np.int64)
        else:
            raise AssertionError(f"unexpected graph input {spec.name}")
    return feed


# -- every family -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", family_params())
def test_convert_writes_one_onnx_file_per_tower(family: str, converted: Callable[[str], Path]) -> None:
    onnx_dir = converted(family) / "onnx"

    assert sorted(p.name for p in onnx_dir.glob("*.onnx")) == sorted(f"{t}.onnx" for t in TOWERS[family])


@pytest.mark.parametrize("family", family_params())
def test_onnx_inputs_have_named_dynamic_batch_and_sequence_axes(family: str, converted: Callable[[str], Path]) -> None:
    for tower in TOWERS[family]:
        graph = onnx.load(converted(family) / "onnx" / f"{tower}.onnx").graph
        for graph_input in graph.input:
            dims = _dims(graph_input)
            assert dims[0] == "batch", (tower, graph_input.name, dims)
            if graph_input.name in TEXT_INPUTS:
                assert dims[1] == "sequence", (tower, graph_input.name, dims)
            else:
                assert all(isinstance(d, int) for d in dims[1:]), (tower, graph_input.name, dims)


@pytest.mark.parametrize("family", family_params())
def test_convert_records_passed_verification_at_two_shapes(family: str, converted: Callable[[str], Path]) -> None:
    verification = manifest(converted(family))["artifacts"]["onnx"]["verification"]

    assert verification["passed"] is True
    assert verification["reference"] == "hf"
    assert verification["gates"]["atol"] > 0
    assert sorted(verification["towers"]) == sorted(TOWERS[family])
    for checks in verification["towers"].values():
        (synthetic,) = [c for c in checks if c["data"] == "synthetic"]
        assert synthetic["feeds"] == 2
        for check in checks:
            assert check["gated"] is True
            assert all(output["passed"] and output["max_abs_diff"] <= verification["gates"]["atol"] for output in check["outputs"].values())


@pytest.mark.parametrize(("family", "real"), [("clip", {"vision": True, "text": True}), ("vit", {"vision": True}), ("bert", {"text": False})])
def test_convert_also_checks_the_export_on_real_data_where_the_model_has_its_processors(
    family: str, real: dict[str, bool], converted: Callable[[str], Path]
) -> None:
    """The demo BERT ships no tokenizer: its text tower can only be checked on synthetic inputs."""
    towers = manifest(converted(family))["artifacts"]["onnx"]["verification"]["towers"]

    assert {t: any(c["data"] == "real" for c in checks) for t, checks in towers.items()} == real


@pytest.mark.parametrize("family", family_params())
def test_onnx_tower_runs_at_a_batch_size_it_was_not_exported_or_verified_at(family: str, converted: Callable[[str], Path]) -> None:
    for tower in TOWERS[family]:
        session = ort.InferenceSession(str(converted(family) / "onnx" / f"{tower}.onnx"), providers=["CPUExecutionProvider"])

        (output,) = session.run(None, _feed(session, batch=5, sequence=11))

        assert output.shape[0] == 5
        assert np.isfinite(output).all()


def test_convert_rerun_with_unchanged_inputs_is_skipped(converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(converted("clip"))
    before = snapshot(model_dir)

    report = vlmopt_json("convert", model_dir)

    assert report["skipped"] is True
    assert snapshot(model_dir) == before


def test_auto_exporter_records_torchscript_for_weights_that_fit_one_protobuf_file(converted: Callable[[str], Path]) -> None:
    towers = manifest(converted("clip"))["artifacts"]["onnx"]["record"]["towers"]

    assert {name: t["exporter"] for name, t in towers.items()} == {"vision": "torchscript", "text": "torchscript"}


def test_dynamo_exporter_also_writes_verified_graphs_with_named_dynamic_axes(exported: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(exported("clip"))

    report = vlmopt_json("convert", model_dir, "--exporter", "dynamo")

    assert report["artifact"]["verification"]["passed"] is True
    assert {t["exporter"] for t in report["artifact"]["record"]["towers"].values()} == {"dynamo"}
    inputs = {i.name: _dims(i) for i in onnx.load(model_dir / "onnx" / "text.onnx").graph.input}
    assert inputs == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}


def test_the_dynamo_exporter_keeps_no_reference_to_the_weights_it_exported(exported: Callable[[str], Path], tmp_path: Path) -> None:
    import gc
    import weakref

    from vlmopt.families import family_for
    from vlmopt.hf import load_config, load_model
    from vlmopt.stages.convert import export_tower

    hf_dir = exported("clip") / "hf"
    config = load_config(hf_dir)
    vision = next(t for t in family_for(config).towers(config, hf_dir) if t.name == "vision")
    model = load_model(hf_dir, config=config)
    weight = weakref.ref(next(model.vision_model.parameters()))

    export_tower(vision.wrap(model).eval(), vision, tmp_path / "vision.onnx", 18, dynamic=True, exporter="dynamo")
    del model
    gc.collect()

    assert weight() is None  # the model's memory goes with it (onnxscript's rewrite rules hold the last graph they matched)


def test_convert_after_the_source_artifact_changed_is_redone(reexported_clip: Path) -> None:
    report = vlmopt_json("convert", reexported_clip)

    assert report["skipped"] is False
    assert report["artifact"]["parent_digest"] == manifest(reexported_clip)["artifacts"]["hf"]["digest"]


def test_convert_refuses_to_write_over_its_own_source_artifact(exported: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]) -> None:
    model_dir = copy_model_dir(exported("clip"))
    before = snapshot(model_dir)

    result = vlmopt("convert", model_dir, "--name", "hf")

    assert result.exit_code == 2, result.output
    assert snapshot(model_dir) == before


@pytest.mark.parametrize("name", ["../escape", "sub/dir", "vlmopt.json", "reports", ".tmp-onnx"])
def test_convert_refuses_an_artifact_name_that_is_not_a_free_folder_name(
    name: str, converted: Callable[[str], Path], copy_model_dir: Callable[[Path], Path]
) -> None:
    model_dir = copy_model_dir(converted("clip"))
    (model_dir / "reports").mkdir()
    (model_dir / "reports" / "bench-20260101-000000.md").write_text("an earlier benchmark")
    before = snapshot(model_dir)

    result = vlmopt("convert", model_dir, "--name", name)

    assert result.exit_code == 2, result.output
    assert snapshot(model_dir) == before
    assert not (model_dir.parent / "escape").exists()


# -- one graph for both towers ------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_monolith(tmp_path_factory: pytest.TempPathFactory, exported: Callable[[str], Path]) -> Path:
    model_dir = tmp_path_factory.mktemp("monolith") / "clip"
    shutil.copytree(exported("clip"), model_dir)
    result = vlmopt("convert", model_dir, "--monolith", "--name", "monolith")
    assert result.exit_code == 0, result.stderr
    return model_dir / "monolith" / "model.onnx"


def test_monolith_graph_outputs_both_embeddings_and_the_zero_shot_logits(clip_monolith: Path) -> None:
    outputs = [o.name for o in onnx.load(clip_monolith).graph.output]

    assert outputs == ["image_embeds", "text_embeds", "logits_per_image"]


def test_monolith_logits_have_one_row_per_image_and_one_column_per_text(clip_monolith: Path) -> None:
    session = ort.InferenceSession(str(clip_monolith), providers=["CPUExecutionProvider"])

    _, _, logits = session.run(None, _feed(session, batch=3, sequence=9, image_batch=2))

    assert logits.shape == (2, 3)


# -- fixed shapes -------------------------------------------------------------------------------
def test_static_convert_fixes_the_image_batch(static_clip: Path) -> None:
    (pixel_values,) = onnx.load(static_clip / "onnx" / "vision.onnx").graph.input

    assert _dims(pixel_values) == [2, 3, 32, 32]


def test_static_convert_fixes_the_text_batch_and_sequence_length(static_clip: Path) -> None:
    inputs = {i.name: _dims(i) for i in onnx.load(static_clip / "onnx" / "text.onnx").graph.input}

    assert inputs == {"input_ids": [2, 8], "attention_mask": [2, 8]}


# -- sentence-transformers pooling --------------------------------------------------------------
@pytest.fixture(scope="module")
def cls_pooled_bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(source folder, converted model directory) of a BERT declaring CLS pooling the sentence-transformers way."""
    root = tmp_path_factory.mktemp("st-bert")
    source = build_demo_model(root / "source", "bert", "tiny")
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (source / "modules.json").write_text(json.dumps(modules))
    (source / "1_Pooling").mkdir()
    pooling = {
        "word_embedding_dimension": 32,
        "pooling_mode_cls_token": True,
        "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    (source / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    model_dir = root / "model"
    vlmopt_json("export", source, "-o", model_dir)
    vlmopt_json("convert", model_dir)
    return source, model_dir


def test_sentence_transformers_cls_pooling_is_recorded(cls_pooled_bert: tuple[Path, Path]) -> None:
    _, model_dir = cls_pooled_bert

    assert manifest(model_dir)["artifacts"]["onnx"]["towers"]["text"]["meta"]["pooling"] == "cls"


def test_cls_pooled_onnx_embedding_is_the_first_tokens_hidden_state(cls_pooled_bert: tuple[Path, Path]) -> None:
    import torch
    from transformers import BertModel

    source, model_dir = cls_pooled_bert
    session = ort.InferenceSession(str(model_dir / "onnx" / "text.onnx"), providers=["CPUExecutionProvider"])
    feed = _feed(session, batch=3, sequence=10)
    model = BertModel.from_pretrained(source, attn_implementation="eager").eval()

    (embedding,) = session.run(None, feed)
    with torch.inference_mode():
        hidden = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).last_hidden_state

    np.testing.assert_allclose(embedding, hidden[:, 0].numpy(), atol=1e-4, rtol=0)
