"""`vlmopt package DIR --triton OUT [ARTIFACT ...]`: a Triton Inference Server model repository.

For each tower, the artifact `bench` recommended (or the one named) becomes one Triton model on the backend
that runs its kind natively (ONNX Runtime, OpenVINO, TensorRT), or, with `--backend python`, on Triton's
python backend through vlmopt's own runner. An ensemble per tower lets a client send raw data: a python
pre-processing step (the model's saved image processor or tokenizer), the tower, and for dual encoders a
normalization step. Every `config.pbtxt` is checked against Triton's schema (`vlmopt.triton.config`) before
anything is written; the repository is written beside OUT and renamed into place, then recorded in the
model directory's manifest (`packages`). A rerun with the same artifacts and options is up to date.

Unlike the stages in `STAGES`, it makes no artifact inside the model directory: OUT may lie anywhere.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

from vlmopt.errors import VlmoptError
from vlmopt.families import Tower, family_named
from vlmopt.records import Choice
from vlmopt.triton import config as triton
from vlmopt.versions import package_version
from vlmopt.workspace import Artifact, FileRecord, ModelDir, content_digest, file_records, fsync_path

BACKENDS = ("native", "python")
#: the Triton backend that serves each artifact kind natively
NATIVE = {"onnx": "onnxruntime", "openvino": "openvino", "tensorrt": "tensorrt"}
#: batch size when neither --max-batch nor a bench run says one
DEFAULT_MAX_BATCH = 8
#: the pre-processing steps' request limits
MAX_IMAGE_PIXELS = 40_000_000
MAX_TEXT_BYTES = 64 * 1024
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_IMAGE_ROLE, _TEXT_ROLES = "image", ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class PackageOptions:
    """What `package` writes; `recorded()` keys the up-to-date check."""

    output: Path
    artifacts: list[str] = field(default_factory=list)
    backend: str = "native"
    onnx_backend: str = "onnxruntime"
    model_name: str | None = None
    max_batch: int | None = None
    max_queue_delay_us: int = 500
    instances: int = 1
    threads: int | None = None

    def check(self) -> None:
        if self.backend not in BACKENDS:
            raise VlmoptError(f"--backend takes {' or '.join(BACKENDS)}, got '{self.backend}'")
        if self.onnx_backend not in ("onnxruntime", "openvino"):
            raise VlmoptError(f"--onnx-backend takes onnxruntime or openvino, got '{self.onnx_backend}'")
        for name, value, low in (("--max-batch", self.max_batch, 1), ("--instances", self.instances, 1), ("--threads", self.threads, 1)):
            if value is not None and value < low:
                raise VlmoptError(f"{name} must be at least {low}, got {value}")
        if self.max_queue_delay_us < 0:
            raise VlmoptError(f"--max-queue-delay-us must be 0 or more, got {self.max_queue_delay_us}")
        if self.model_name is not None and not _MODEL_NAME.match(self.model_name):
            raise VlmoptError(f"--model-name '{self.model_name}' must be letters, digits, '_' and '-' (Triton model names are folder names)")

    def recorded(self) -> dict[str, Any]:
        return {
            "artifacts": list(self.artifacts),
            "backend": self.backend,
            "onnx_backend": self.onnx_backend,
            "model_name": self.model_name,
            "max_batch": self.max_batch,
            "max_queue_delay_us": self.max_queue_delay_us,
            "instances": self.instances,
            "threads": self.threads,
        }


@dataclass
class Served:
    """One tower going into the repository: the artifact, why it was chosen, and the Triton model that serves it."""

    tower: str
    artifact: Artifact
    reason: str
    serving: str = ""
    device: str = "cpu"
    inputs: list[triton.Tensor] = field(default_factory=list)
    outputs: list[triton.Tensor] = field(default_factory=list)
    max_batch: int = DEFAULT_MAX_BATCH
    preferred: tuple[int, ...] = ()
    batching_reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "artifact": self.artifact.name,
            "digest": self.artifact.digest,
            "kind": self.artifact.kind,
            "reason": self.reason,
            "serving": self.serving,
            "device": self.device,
            "max_batch_size": self.max_batch,
            "preferred_batch_sizes": list(self.preferred),
            "batching": self.batching_reason,
        }


@dataclass
class PackageResult:
    """What `package` did: the repository, the models in it, the artifact per tower and why."""

    path: str
    skipped: bool
    towers: dict[str, dict[str, Any]]
    models: list[str]
    files: list[str]
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"stage": "package", "path": self.path, "skipped": self.skipped, "reason": self.reason, "towers": self.towers, "models": self.models}


# -- choosing the artifacts ------------------------------------------------------------------------------
def _named(model_dir: ModelDir, names: list[str]) -> dict[str, tuple[Artifact, str]]:
    """`ARTIFACT` (every tower it has) or `TOWER=ARTIFACT`; a tower named twice is refused."""
    chosen: dict[str, tuple[Artifact, str]] = {}
    for entry in names:
        tower, sep, name = entry.rpartition("=")
        artifact = model_dir.artifact(name)
        towers = [tower] if sep else [t for t in artifact.towers if t != "model" or len(artifact.towers) == 1]
        if sep and tower not in artifact.towers:
            raise VlmoptError(f"artifact '{name}' has no {tower} tower (its towers: {', '.join(artifact.towers) or 'none'})")
        if not towers and artifact.kind == "hf":
            _refuse_kind(artifact)
        for t in towers:
            if t in chosen:
                raise VlmoptError(f"the {t} tower is named twice ({chosen[t][0].name} and {name}); name one artifact per tower, e.g. {t}={name}")
            chosen[t] = (artifact, "named on the command line")
    return chosen


def _recommended(model_dir: ModelDir) -> dict[str, tuple[Artifact, str]]:
    """Per tower, what the last bench chose at its largest batch (the batch a dynamic batcher serves)."""
    recommendation = model_dir.recommendation()
    if recommendation is None:
        raise VlmoptError(
            f"no bench has chosen an artifact for {model_dir.path} yet; run `vlmopt bench {model_dir.path}` first, or name the artifacts: "
            f"vlmopt package {model_dir.path} --triton OUT onnx"
        )
    artifacts = model_dir.load()
    by_tower: dict[str, list[Choice]] = {}
    for choice in recommendation.choices:
        by_tower.setdefault(choice.tower, []).append(choice)
    if len(by_tower) > 1:
        by_tower.pop("model", None)  # a one-graph monolith, when towers are benched separately too
    chosen = {}
    for tower, choices in by_tower.items():
        passed = sorted((c for c in choices if c.artifact is not None), key=lambda c: c.batch, reverse=True)
        if not passed:
            raise VlmoptError(
                f"in {recommendation.report}, no artifact passed its fidelity gate for the {tower} tower; name the artifact to package, "
                f"e.g. vlmopt package {model_dir.path} --triton OUT {tower}=onnx"
            )
        best = passed[0]
        assert best.artifact is not None
        artifact = artifacts.get(best.artifact)
        if artifact is None or artifact.digest != best.digest:
            raise VlmoptError(
                f"'{best.artifact}', which bench recommended for the {tower} tower, was {'removed' if artifact is None else 're-made'} since "
                f"{recommendation.report}; run `vlmopt bench {model_dir.path}` again, or name the artifact to package"
            )
        speed = f", {best.speedup:.2f}x PyTorch" if best.speedup is not None else ""
        cosine = f", cosine {best.cosine_min:.6f}" if best.cosine_min is not None else ""
        why = f"the fastest that passed its gate at batch {best.batch} in {recommendation.report}{speed}{cosine} ({best.gate})"
        chosen[tower] = (model_dir.require_intact(artifact), why)
    return chosen


def _refuse_kind(artifact: Artifact) -> None:
    raise VlmoptError(
        f"'{artifact.name}' is a Hugging Face checkpoint, the PyTorch reference, not a deployment artifact; package an exported one "
        f"(run `vlmopt convert` first, then name it, e.g. onnx)"
    )


def _check_servable(served: Served, options: PackageOptions) -> None:
    """Refuse, in one line, an artifact this repository cannot serve."""
    artifact, tower = served.artifact, served.tower
    if artifact.kind == "hf":
        _refuse_kind(artifact)
    if artifact.kind not in NATIVE:
        raise VlmoptError(f"'{artifact.name}' is a {artifact.kind} artifact, which Triton cannot serve; package an ONNX, OpenVINO or TensorRT artifact")
    family = family_named(artifact.traits.family)
    if family is not None and family.generative:
        raise VlmoptError(
            f"'{artifact.name}' is a generative {family.name} model; `vlmopt package` writes encoder towers (serve generation with `vlmopt serve`)"
        )
    if tower == "model":
        raise VlmoptError(
            f"'{artifact.name}' is one graph of both towers (convert --monolith), whose two batch axes Triton's batcher cannot serve; "
            "package the separate towers (vlmopt convert without --monolith)"
        )
    served.device = "gpu" if artifact.kind == "tensorrt" else "cpu"
    if options.backend == "python":
        served.serving = "python"
        return
    served.serving = options.onnx_backend if artifact.kind == "onnx" else NATIVE[artifact.kind]
    if served.serving == "openvino" and artifact.kind == "onnx" and (artifact.traits.fused or artifact.traits.ort_only_ops):
        ops = ", ".join(artifact.traits.ort_only_ops) or "com.microsoft"
        raise VlmoptError(
            f"'{artifact.name}' is fused by ONNX Runtime's optimizer (operators of {ops}), which Triton's OpenVINO backend cannot read; "
            "package its unfused parent, or use --onnx-backend onnxruntime"
        )


# -- tensors and batching ----------------------------------------------------------------------------------
def _data_type(dtype: str, where: str) -> str:
    if dtype not in triton.DATA_TYPES:
        raise VlmoptError(f"{where} has element type {dtype}, which vlmopt cannot write into a Triton configuration")
    return triton.DATA_TYPES[dtype]


def _onnx_tensors(path: Path) -> tuple[list[tuple[str, str, list[Any]]], list[tuple[str, str, list[Any]]]]:
    """(name, dtype, shape with names for free axes) of a graph's inputs and outputs, read from the file itself."""
    import onnx
    from onnx import helper

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}

    def described(values: Any) -> list[tuple[str, str, list[Any]]]:
        found = []
        for value in values:
            if value.name in initializers:
                continue
            tensor = value.type.tensor_type
            dtype = str(helper.tensor_dtype_to_np_dtype(tensor.elem_type))
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]
            found.append((value.name, dtype, shape))
        return found

    return described(graph.input), described(graph.output)


def _batched_tensors(described: list[tuple[str, str, list[Any]]], where: str) -> list[triton.Tensor]:
    """Triton tensors of a batching model: the batch axis (the first, which must be free) dropped, free axes -1."""
    tensors = []
    for name, dtype, shape in described:
        if not shape or not isinstance(shape[0], str):
            first = shape[0] if shape else "none"
            raise VlmoptError(
                f"{where}: {name} has a fixed batch of {first} (no batch axis), and Triton's dynamic batcher needs one; "
                "package an artifact made without a static batch (convert without --static, openvino without --static-batch)"
            )
        tensors.append(triton.Tensor(name, _data_type(dtype, f"{where}: {name}"), tuple(-1 if isinstance(d, str) else int(d) for d in shape[1:])))
    return tensors


def _record_tensors(specs: Any) -> list[tuple[str, str, list[Any]]]:
    return [(s.name, s.dtype, list(s.shape)) for s in specs]


def _engine_tensors(served: Served, tower: Tower) -> tuple[list[triton.Tensor], int]:
    """An engine's inputs from its optimization profiles: -1 where a dimension ranges, and the largest batch all admit."""
    record = served.artifact.towers[served.tower]
    profiles = (record.engine or {}).get("profiles") or {}
    where = f"engine '{served.artifact.name}' ({served.tower} tower)"
    tensors, max_batch = [], None
    for spec in tower.inputs:
        profile = profiles.get(spec.name)
        if profile is None or not isinstance(spec.shape[0], str) or len(profile["min"]) != len(spec.shape) or profile["min"][0] != 1:
            raise VlmoptError(
                f"{where}: the optimization profile of {spec.name} has no batch axis from 1 "
                f"({'no profile' if profile is None else 'min ' + 'x'.join(map(str, profile['min'])) + ', max ' + 'x'.join(map(str, profile['max']))}), "
                "and Triton's dynamic batcher needs one; rebuild it with `vlmopt build` and a dynamic batch (--max-batch)"
            )
        low, high = profile["min"], profile["max"]
        dims = tuple(-1 if low[i] != high[i] else int(high[i]) for i in range(1, len(spec.shape)))
        tensors.append(triton.Tensor(spec.name, _data_type(spec.dtype, f"{where}: {spec.name}"), dims))
        max_batch = high[0] if max_batch is None else min(max_batch, high[0])
    return tensors, int(max_batch or 1)


def _describe(served: Served, model_dir: ModelDir) -> None:
    """The tower model's tensors and the largest batch its artifact admits (None: any)."""
    record = served.artifact.towers[served.tower]
    tower = record.tower
    where = f"'{served.artifact.name}' ({served.tower} tower)"
    served.outputs = _batched_tensors(_record_tensors(tower.outputs), where)
    if served.serving == "tensorrt":
        served.inputs, served.max_batch = _engine_tensors(served, tower)
        return
    if served.serving == "onnxruntime":
        inputs, outputs = _onnx_tensors(model_dir.artifact_path(served.artifact.name) / (record.file or ""))
        served.inputs = _batched_tensors(inputs, where)
        served.outputs = _batched_tensors(outputs, where)
        return
    served.inputs = _batched_tensors(_record_tensors(tower.inputs), where)


def _bench_throughput(artifact: Artifact, tower: str) -> dict[int, float]:
    rows = (artifact.benchmark or {}).get("rows") or []
    return {int(r["batch"]): float(r["throughput"]) for r in rows if r.get("tower") == tower and r.get("throughput")}


def _batching(served: Served, options: PackageOptions) -> None:
    """max_batch_size (--max-batch; else an engine's largest profile batch; else the largest batch bench measured, else 8)
    and the preferred batch sizes: the measured batches at which throughput still grew."""
    measured = _bench_throughput(served.artifact, served.tower)
    cap = served.max_batch if served.serving == "tensorrt" else None
    wanted = options.max_batch or cap or (max(measured) if measured else None) or DEFAULT_MAX_BATCH
    if cap is not None and options.max_batch is not None and options.max_batch > cap:
        raise VlmoptError(f"--max-batch {options.max_batch} is above the {cap} that engine '{served.artifact.name}' ({served.tower} tower) admits")
    served.max_batch = min(wanted, cap) if cap is not None else wanted
    growing, best = [], 0.0
    for batch in sorted(measured):
        if measured[batch] > best:
            best = measured[batch]
            if 1 < batch <= served.max_batch:
                growing.append(batch)
    served.preferred = tuple(growing)
    if measured:
        shown = ", ".join(f"{b}: {measured[b]:.1f}/s" for b in sorted(measured))
        served.batching_reason = f"bench throughput by batch ({shown}); preferred: the batches where it still grew"
    else:
        served.batching_reason = "no bench measurement of this artifact: no preferred batch sizes"


# -- pre-processing ----------------------------------------------------------------------------------------
def _input_kind(tower: Tower) -> str:
    roles = {spec.role for spec in tower.inputs}
    if roles == {_IMAGE_ROLE}:
        return "image"
    if roles and roles <= set(_TEXT_ROLES):
        return "text"
    raise VlmoptError(f"the {tower.name} tower takes {', '.join(s.name for s in tower.inputs)}, which no pre-processing step of `package` makes")


def _processor(model_dir: ModelDir, served: Served, kind: str) -> Any:
    """The saved image processor or tokenizer of the checkpoint the artifact descends from; refused when it has none."""
    from vlmopt.calibration import saved_processors

    folder = model_dir.checkpoint_folder(served.artifact)
    tokenizer, image_processor = saved_processors(folder)
    found = image_processor if kind == "image" else tokenizer
    if found is None:
        what = "image processor (preprocessor_config.json or processor_config.json)" if kind == "image" else "tokenizer (tokenizer.json or vocab files)"
        raise VlmoptError(
            f"the {served.tower} tower's pre-processing needs the model's {what}, and {folder} has none that loads; re-export from a checkpoint that ships one"
        )
    return found


def _text_length(tower: Tower) -> int:
    """The fixed length text is padded to (the graph's, else the model's longest), so requests batch together."""
    for spec in tower.inputs:
        if spec.role == "input_ids" and len(spec.shape) > 1 and isinstance(spec.shape[1], int):
            return spec.shape[1]
    if tower.vocab is None:
        raise VlmoptError(f"the {tower.name} tower records no vocabulary, so its text length is unknown; re-run `vlmopt convert`")
    return tower.vocab.max_length


# -- the repository ---------------------------------------------------------------------------------------
@dataclass
class _Model:
    """One model folder of the repository: its config text and files (relative path -> source file or bytes)."""

    name: str
    config: str
    files: dict[str, Path | bytes] = field(default_factory=dict)


def _template(name: str) -> bytes:
    return resources.files("vlmopt.triton").joinpath("models", f"{name}.py").read_bytes()


def _tower_models(model_dir: ModelDir, served: Served, name: str, options: PackageOptions, threads: int | None) -> _Model:
    artifact, record = served.artifact, served.artifact.towers[served.tower]
    folder = model_dir.artifact_path(artifact.name)
    batching = triton.Batching(served.max_batch, served.preferred, options.max_queue_delay_us)
    files: dict[str, Path | bytes] = {}
    extra = {}
    if served.serving == "python":
        extra = {"tower": served.tower}
        files["1/model.py"] = _template("runner")
        tower_files = artifact.tower_files(served.tower)
        for f in tower_files:
            files[f"1/artifact/{f.path}"] = folder / f.path
        mine = Artifact.from_json(artifact.to_json())
        mine.towers = {served.tower: record}
        mine.files = tower_files
        mine.benchmark = None
        files["1/artifact.json"] = (json.dumps(mine.to_json(), indent=2) + "\n").encode()
    else:
        target = triton.MODEL_FILES[artifact.kind]
        stem = record.file or ""
        for f in artifact.tower_files(served.tower):
            if f.path == stem:
                files[f"1/{target}"] = folder / f.path
            elif artifact.kind == "openvino" and f.path.endswith(".bin"):
                files[f"1/{Path(target).with_suffix('.bin')}"] = folder / f.path  # OpenVINO finds the weights by the IR's name
            else:
                files[f"1/{f.path}"] = folder / f.path  # ONNX external data: the graph names its file
    model_file = None if served.serving == "python" else triton.MODEL_FILES[artifact.kind]
    config = triton.tower_config(name, served.serving, served.inputs, served.outputs, batching, options.instances, served.device, threads, extra, model_file)
    return _Model(name, triton.render(config), files)


def _processor_files(processor: Any) -> dict[str, bytes]:
    """What `save_pretrained` writes for a processor, read back (so the config step and the files are made before any write)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="vlmopt-processor-") as tmp:
        processor.save_pretrained(tmp)
        return {f"1/processor/{p.relative_to(tmp).as_posix()}": p.read_bytes() for p in sorted(Path(tmp).rglob("*")) if p.is_file()}


def _plan_models(
    model_dir: ModelDir, towers: dict[str, Served], prefix: str, options: PackageOptions, threads: int | None
) -> tuple[list[_Model], list[dict[str, Any]]]:
    """Every model of the repository (configs rendered and checked) and, per ensemble, what a client sends and gets."""
    models: list[_Model] = []
    entries: list[dict[str, Any]] = []
    normalizer = f"{prefix}_normalize"
    for tower_name, served in towers.items():
        tower = served.artifact.towers[tower_name].tower
        kind = _input_kind(tower)
        processor = _processor(model_dir, served, kind)
        graph = f"{prefix}_{tower_name}_{served.serving}"
        models.append(_tower_models(model_dir, served, graph, options, threads))
        batch = served.max_batch
        batching = triton.Batching(batch, served.preferred, options.max_queue_delay_us)
        raw = triton.Tensor("image" if kind == "image" else "text", "TYPE_STRING", (1,))
        prep_name = f"{prefix}_{tower_name}_preprocess"
        values: dict[str, str] = {"kind": kind}
        if kind == "image":
            values["max_image_pixels"] = str(MAX_IMAGE_PIXELS)
            made = list(served.inputs)
        else:
            length = _text_length(tower)
            values.update(max_length=str(length), max_text_bytes=str(MAX_TEXT_BYTES))
            made = [triton.Tensor(t.name, t.data_type, (length,)) for t in served.inputs]
        prep = triton.python_config(prep_name, [raw], made, batching, options.instances, values)
        models.append(_Model(prep_name, triton.render(prep), {"1/model.py": _template("preprocess"), **_processor_files(processor)}))

        steps = [triton.Step(prep_name, {raw.name: raw.name}, {t.name: t.name for t in made})]
        steps.append(triton.Step(graph, {t.name: t.name for t in served.inputs}, {t.name: f"{t.name}_raw" for t in served.outputs}))
        normalized = tower.meta.get("embeddings") == "unnormalized"
        if normalized:
            out = served.outputs[0]
            if len(served.outputs) != 1:
                raise VlmoptError(f"the {tower_name} tower has {len(served.outputs)} outputs; normalization takes one embedding")
            steps.append(triton.Step(normalizer, {"embeds": f"{out.name}_raw"}, {"embedding": out.name}))
            if not any(m.name == normalizer for m in models):
                embeds = [triton.Tensor("embeds", "TYPE_FP32", (-1,))]
                norm = triton.python_config(normalizer, embeds, [triton.Tensor("embedding", "TYPE_FP32", (-1,))], batching, options.instances)
                models.append(_Model(normalizer, triton.render(norm), {"1/model.py": _template("normalize")}))
        else:
            steps[-1] = triton.Step(graph, steps[-1].inputs, {t.name: t.name for t in served.outputs})
        ensemble_name = f"{prefix}_{tower_name}"
        outputs = [triton.Tensor(t.name, "TYPE_FP32" if normalized else t.data_type, t.dims) for t in served.outputs]
        models.append(_Model(ensemble_name, triton.render(triton.ensemble_config(ensemble_name, [raw], outputs, batch, steps))))
        entries.append(
            {
                "tower": tower_name,
                "ensemble": ensemble_name,
                "graph": graph,
                "preprocess": prep_name,
                "input": raw.name,
                "kind": kind,
                "outputs": [{"name": t.name, "dims": list(t.dims)} for t in outputs],
                "normalized": normalized,
                "graph_inputs": [{"name": t.name, "data_type": t.data_type, "dims": list(t.dims)} for t in served.inputs],
            }
        )
    return models, entries


# -- writing ------------------------------------------------------------------------------------------------
def _check_output(model_dir: ModelDir, out: Path, force: bool, ours: bool) -> None:
    """Refuse an OUT that is (inside) the model directory or an artifact, a file, or a non-empty folder, unless `force`
    or `ours`: the repository this directory recorded there, untouched since (re-made with other artifacts or options)."""
    home = model_dir.path.resolve()
    target = out.resolve()
    if target == home or any(target == (home / name).resolve() or (home / name).resolve() in target.parents for name in model_dir.load()):
        raise VlmoptError(
            f"--triton {out} is the model directory or one of its artifacts; choose another folder (e.g. {model_dir.path}/triton or build/triton)"
        )
    if target in home.parents:
        raise VlmoptError(f"--triton {out} holds the model directory; choose a new or empty folder")
    if out.exists() and not out.is_dir():
        raise VlmoptError(f"--triton {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force and not ours:
        raise VlmoptError(f"--triton {out} is a non-empty folder; choose a new or empty one, or add --force to replace it")


def _write(staging: Path, models: list[_Model], extra: dict[str, bytes]) -> None:
    for model in models:
        folder = staging / model.name
        (folder / "1").mkdir(parents=True)
        (folder / "config.pbtxt").write_text(model.config)
        for rel, source in model.files.items():
            dest = folder / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(source, Path):
                shutil.copyfile(source, dest)
            else:
                dest.write_bytes(source)
    for rel, data in extra.items():
        (staging / rel).write_bytes(data)


def _fsync_tree(folder: Path) -> None:
    for root, _, names in os.walk(folder):
        for name in names:
            fsync_path(Path(root) / name)
    for root, _, _ in os.walk(folder, topdown=False):
        fsync_path(Path(root))


def _swap_in(staging: Path, out: Path) -> None:
    """Rename the staged repository to OUT; an existing OUT (with --force) is moved aside first and removed after."""
    backup = None
    if os.path.lexists(out):
        backup = out.parent / f".old-{out.name}-{secrets.token_hex(4)}"
        os.replace(out, backup)
    try:
        os.replace(staging, out)
    except BaseException:
        if backup is not None:
            os.replace(backup, out)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def _up_to_date(entry: dict[str, Any] | None, key: dict[str, Any], out: Path) -> bool:
    if not entry or entry.get("key") != key or not out.is_dir():
        return False
    return content_digest(file_records(out)) == entry.get("digest")


def package(
    directory: str | os.PathLike[str] | ModelDir,
    options: PackageOptions,
    force: bool = False,
    progress: Callable[[str], None] = lambda message: None,
) -> PackageResult:
    """Write the Triton repository `options.output` from the model directory; refused (VlmoptError, nothing written)
    when an artifact cannot be served, a tokenizer or processor is missing, or OUT is a non-empty folder without `force`."""
    options.check()
    model_dir = directory if isinstance(directory, ModelDir) else ModelDir.open(directory)
    out = Path(options.output)
    with model_dir.lock():
        chosen = _named(model_dir, options.artifacts) if options.artifacts else _recommended(model_dir)
        towers = {name: Served(name, artifact, why) for name, (artifact, why) in chosen.items()}
        for served in towers.values():
            _check_servable(served, options)
            model_dir.require_intact(served.artifact)
            _describe(served, model_dir)
            _batching(served, options)
        prefix = options.model_name or re.sub(r"[^A-Za-z0-9_-]", "_", model_dir.path.resolve().name).lstrip("_-") or "model"
        key = {
            "options": options.recorded(),
            "towers": {t: [s.artifact.name, s.artifact.digest] for t, s in towers.items()},
            "vlmopt": package_version("vlmopt"),
        }
        path_key = str(out.resolve())
        recorded = model_dir.packages().get(path_key)
        if not force and _up_to_date(recorded, key, out):
            assert recorded is not None
            return PackageResult(path_key, True, recorded["towers"], recorded["models"], [], reason="up to date: the same artifacts and options")
        ours = recorded is not None and out.is_dir() and content_digest(file_records(out)) == recorded.get("digest")
        _check_output(model_dir, out, force, ours)

        progress("writing the model configurations")
        models, entries = _plan_models(model_dir, towers, prefix, options, options.threads)
        from vlmopt.triton.repository import dockerfile, readme

        extra = {
            "README.md": readme(out, models, entries, towers, options).encode(),
            "Dockerfile": dockerfile(options.backend).encode(),
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = out.parent / f".tmp-{out.name}-{secrets.token_hex(4)}"
        try:
            staging.mkdir()
            progress(f"copying the artifacts into {out}")
            _write(staging, models, extra)
            _fsync_tree(staging)
            files = file_records(staging)
            _swap_in(staging, out)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        entry = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "kind": "triton",
            "triton_release": triton.TRITON_RELEASE,
            "key": key,
            "towers": {t: s.to_json() for t, s in towers.items()},
            "models": [m.name for m in models],
            "ensembles": entries,
            "digest": content_digest(files),
            "files": [_file_json(f) for f in files],
        }
        model_dir.record_package(path_key, entry)
    return PackageResult(path_key, False, entry["towers"], entry["models"], [f.path for f in files])


def _file_json(record: FileRecord) -> dict[str, Any]:
    return {"path": record.path, "sha256": record.sha256, "size": record.size}
