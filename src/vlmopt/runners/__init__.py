"""Backends behind one interface, and `ArtifactRunners`: the runners of any artifact, committed or being made."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from vlmopt.errors import VlmoptError
from vlmopt.families import Tower, family_for
from vlmopt.runners.base import Runner
from vlmopt.runners.ort_runner import OrtRunner
from vlmopt.runners.torch_runner import TorchRunner

__all__ = ["BACKENDS", "ArtifactRunners", "OrtRunner", "Runner", "TorchRunner", "set_threads"]

#: the backend that runs each artifact kind
BACKENDS = {"hf": "pytorch", "onnx": "onnxruntime", "tensorrt": "tensorrt", "openvino": "openvino"}


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


class ArtifactRunners:
    """Towers and runners of one artifact in `folder`; a Hugging Face artifact loads its model once for all towers
    (or uses `model`, already loaded). A context manager: leaving it releases the model."""

    def __init__(
        self,
        folder: Path,
        artifact: Any,
        threads: int | None = None,
        attn_implementation: str | None = None,
        device: str = "cpu",
        torch_dtype: str = "float32",
        cuda_graphs: bool = False,
        model: Any = None,
        spinning: bool = True,
    ):
        self.folder = Path(folder)
        #: ONNX Runtime's intra-op threads spin between runs (its default); off for a server (see OrtRunner)
        self.spinning = spinning
        self.artifact = artifact
        self.threads = threads
        self.attn_implementation = attn_implementation
        self.device = device
        self.torch_dtype = torch_dtype
        self.cuda_graphs = cuda_graphs
        self._model: Any = model
        self._family = None
        self._config = None
        if artifact.kind not in BACKENDS:
            raise VlmoptError(f"artifact '{artifact.name}' is of kind '{artifact.kind}', which has no runner on this machine")

    def __enter__(self) -> ArtifactRunners:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def backend(self) -> str:
        return BACKENDS[self.artifact.kind]

    def _hf(self) -> tuple[Any, Any]:
        if self._config is None:
            from vlmopt.hf import load_config

            self._config = load_config(self.folder)
            self._family = family_for(self._config)
        return self._config, self._family

    def towers(self, include_monolith: bool = False) -> dict[str, Tower]:
        """The artifact's towers; a Hugging Face dual encoder also offers the one-graph `model` when asked."""
        if self.artifact.kind != "hf":
            return {name: record.tower for name, record in self.artifact.towers.items()}
        config, family = self._hf()
        towers = family.towers(config, self.folder, monolith=False)
        if include_monolith and family.supports_monolith:
            towers += family.towers(config, self.folder, monolith=True)
        return {t.name: t for t in towers}

    def runner(self, tower: Tower) -> Runner:
        """A runner of `tower` (the caller closes it, best with `with`)."""
        input_names = [s.name for s in tower.inputs]
        output_names = [s.name for s in tower.outputs]
        if self.artifact.kind == "tensorrt":
            from vlmopt.runners.tensorrt_runner import TensorRTRunner

            record = self.artifact.towers[tower.name]
            remake = shlex.join(["vlmopt", "build", str(self.folder.parent), *record.engine.get("remake_args", []), "--force"])
            return TensorRTRunner(self._file(tower), record.engine, remake, cuda_graph=self.cuda_graphs)
        if self.artifact.kind == "openvino":
            from vlmopt.runners.openvino_runner import OpenVINORunner

            path = self._file(tower)
            record = self.artifact.towers[tower.name]
            runner = OpenVINORunner(path, record.engine or {}, threads=self.threads, names=(input_names, output_names))
            if sorted(runner.input_names) != sorted(input_names):
                runner.close()
                raise VlmoptError(
                    f"{path} takes inputs {runner.input_names}, but the manifest records {input_names}; re-run the stage that made it with --force"
                )
            return runner
        if self.artifact.kind == "onnx":
            path = self._file(tower)
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.device == "cuda" else None
            runner: Runner = OrtRunner(path, threads=self.threads, providers=providers, spinning=self.spinning)
            if runner.input_names != input_names:
                raise VlmoptError(
                    f"{path} takes inputs {runner.input_names}, but the manifest records {input_names}; re-run the stage that made it with --force"
                )
            return runner
        set_threads(self.threads)
        config, family = self._hf()
        if self._model is None:
            from vlmopt.hf import load_model

            self._model = load_model(self.folder, config=config, family=family, attn_implementation=self.attn_implementation)
        maker = tower.meta.get("maker", "torch")  # the wrapper of the candidate's contract
        full = {t.name: t for t in family.towers(config, self.folder, monolith=tower.name == "model", decoder=maker)}
        import torch

        dtype = getattr(torch, self.torch_dtype)
        return TorchRunner(full[tower.name].wrap(self._model), input_names, output_names, device=self.device, dtype=dtype)

    def _file(self, tower: Tower) -> Path:
        return self.folder / (self.artifact.towers[tower.name].file or "")

    def size_bytes(self, tower: Tower, runner: Runner) -> int:
        if isinstance(runner, TorchRunner):
            return runner.parameter_bytes()
        return sum(f.size for f in self.artifact.tower_files(tower.name))

    def close(self) -> None:
        self._model = None
