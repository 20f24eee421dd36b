"""Backends behind one interface, and `ArtifactRunners`: the runners of any artifact in a model directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmopt.errors import VlmoptError
from vlmopt.families import Tower, family_for
from vlmopt.runners.base import Runner
from vlmopt.runners.ort_runner import OrtRunner
from vlmopt.runners.torch_runner import TorchRunner
from vlmopt.workspace import Artifact, ModelDir

__all__ = ["ArtifactRunners", "OrtRunner", "Runner", "TorchRunner", "set_threads"]


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


class ArtifactRunners:
    """Towers and runners of one artifact; a Hugging Face artifact loads its model once for all towers."""

    def __init__(
        self,
        model_dir: ModelDir,
        artifact: Artifact,
        threads: int | None = None,
        attn_implementation: str | None = None,
        device: str = "cpu",
        torch_dtype: str = "float32",
        cuda_graphs: bool = False,
    ):
        self.model_dir = model_dir
        self.artifact = artifact
        self.threads = threads
        self.attn_implementation = attn_implementation
        self.device = device
        self.torch_dtype = torch_dtype
        self.cuda_graphs = cuda_graphs
        self._model: Any = None
        self._family = None
        self._config = None
        if artifact.kind not in ("hf", "onnx", "tensorrt"):
            raise VlmoptError(f"artifact '{artifact.name}' is of kind '{artifact.kind}', which has no runner on this machine")

    @property
    def backend(self) -> str:
        return {"hf": "pytorch", "onnx": "onnxruntime", "tensorrt": "tensorrt"}[self.artifact.kind]

    def _hf(self) -> tuple[Any, Any]:
        if self._config is None:
            from vlmopt.hf import load_config

            self._config = load_config(self.model_dir.artifact_path(self.artifact.name))
            self._family = family_for(self._config)
        return self._config, self._family

    def towers(self, include_monolith: bool = False) -> dict[str, Tower]:
        """The artifact's towers; a Hugging Face dual encoder also offers the one-graph `model` when asked."""
        if self.artifact.kind in ("onnx", "tensorrt"):
            return {name: Tower.from_json(name, data) for name, data in self.artifact.towers.items()}
        config, family = self._hf()
        path = self.model_dir.artifact_path(self.artifact.name)
        towers = family.towers(config, path, monolith=False)
        if include_monolith and family.supports_monolith:
            towers += family.towers(config, path, monolith=True)
        return {t.name: t for t in towers}

    def runner(self, tower: Tower) -> Runner:
        input_names = [s.name for s in tower.inputs]
        output_names = [s.name for s in tower.outputs]
        if self.artifact.kind == "tensorrt":
            from vlmopt.runners.tensorrt_runner import TensorRTRunner
            from vlmopt.stages.build import BuildOptions, rebuild_command

            known = {k: v for k, v in self.artifact.options.items() if k in BuildOptions.__dataclass_fields__}
            rebuild = rebuild_command(self.model_dir, BuildOptions(**known))
            return TensorRTRunner(self._file(tower), self.artifact.towers[tower.name]["engine"], rebuild, cuda_graph=self.cuda_graphs)
        if self.artifact.kind == "onnx":
            path = self._file(tower)
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.device == "cuda" else None
            runner: Runner = OrtRunner(path, threads=self.threads, providers=providers)
            if runner.input_names != input_names:
                raise VlmoptError(
                    f"{path} takes inputs {runner.input_names}, but the manifest records {input_names}; re-run the stage that made it with --force"
                )
            return runner
        set_threads(self.threads)
        config, family = self._hf()
        if self._model is None:
            from vlmopt.hf import load_model

            self._model = load_model(
                self.model_dir.artifact_path(self.artifact.name), config=config, family=family, attn_implementation=self.attn_implementation
            )
        full = {t.name: t for t in family.towers(config, self.model_dir.artifact_path(self.artifact.name), monolith=tower.name == "model")}
        import torch

        dtype = getattr(torch, self.torch_dtype)
        return TorchRunner(full[tower.name].wrap(self._model), input_names, output_names, device=self.device, dtype=dtype)

    def _file(self, tower: Tower) -> Path:
        return self.model_dir.artifact_path(self.artifact.name) / self.artifact.towers[tower.name]["file"]

    def size_bytes(self, tower: Tower, runner: Runner) -> int:
        if isinstance(runner, TorchRunner):
            return runner.parameter_bytes()
        stem = self.artifact.towers[tower.name]["file"]
        return sum(f.size for f in self.artifact.files if f.path == stem or f.path.startswith(stem + "."))

    def close(self) -> None:
        self._model = None
