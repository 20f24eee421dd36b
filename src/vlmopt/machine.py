"""What this machine can run: torch and CUDA, GPUs, ONNX Runtime providers, TensorRT. Used by `doctor`, `build` and the GPU runners."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlmopt.errors import VlmoptError
from vlmopt.versions import package_version

INSTALL_TENSORRT = "pip install 'vlmopt[tensorrt]'"


@dataclass
class Gpu:
    index: int
    name: str
    compute_capability: tuple[int, int]
    memory_gb: float


@dataclass
class Machine:
    torch: str | None
    torch_cuda: str | None
    gpus: list[Gpu] = field(default_factory=list)
    onnxruntime: str | None = None
    ort_providers: list[str] = field(default_factory=list)
    tensorrt: str | None = None
    tensorrt_problem: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "torch": self.torch,
            "torch_cuda": self.torch_cuda,
            "gpus": [{**g.__dict__, "compute_capability": f"{g.compute_capability[0]}.{g.compute_capability[1]}"} for g in self.gpus],
            "onnxruntime": self.onnxruntime,
            "onnxruntime_providers": self.ort_providers,
            "tensorrt": self.tensorrt,
            "tensorrt_problem": self.tensorrt_problem,
        }


def tensorrt_status() -> tuple[str | None, str | None]:
    """(version, None) when `import tensorrt` works, else (None, why not)."""
    try:
        import tensorrt
    except ImportError:
        return None, f"TensorRT is not installed ({INSTALL_TENSORRT})"
    except OSError as exc:  # the wheel is there but its CUDA libraries are not
        return None, f"TensorRT is installed but cannot load its libraries: {str(exc).splitlines()[0][:160]}"
    return tensorrt.__version__, None


def gpus() -> list[Gpu]:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return []
    if not torch.cuda.is_available():
        return []
    found = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        found.append(Gpu(index, props.name, (props.major, props.minor), round(props.total_memory / 2**30, 1)))
    return found


def probe() -> Machine:
    import onnxruntime
    import torch

    version, problem = tensorrt_status()
    return Machine(
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        gpus=gpus(),
        onnxruntime=package_version("onnxruntime") or package_version("onnxruntime-gpu"),
        ort_providers=list(onnxruntime.get_available_providers()),
        tensorrt=version,
        tensorrt_problem=problem,
    )


def require_tensorrt_gpu(purpose: str = "vlmopt build") -> tuple[str, Gpu]:
    """TensorRT's version and the GPU to build for or run on; one clear line naming what is missing otherwise."""
    version, problem = tensorrt_status()
    found = gpus()
    if version is None:
        also = "" if found else "; and torch sees no CUDA GPU"
        raise VlmoptError(f"{purpose} needs TensorRT and a CUDA GPU: {problem}{also}")
    if not found:
        import torch

        where = "torch is a CPU-only build" if torch.version.cuda is None else "torch sees no CUDA device"
        raise VlmoptError(f"{purpose} needs a CUDA GPU, and {where} (TensorRT {version} is installed)")
    return version, found[0]


def stages_usable(machine: Machine) -> list[dict[str, str]]:
    """Each vlmopt stage: usable here or not, and what to install for it."""
    gpu = bool(machine.gpus)
    trt = machine.tensorrt is not None
    rows = [
        {"stage": stage, "usable": "yes", "needs": "torch, onnxruntime (installed)"}
        for stage in ("demo-model", "export", "convert", "optimize", "quantize", "prune", "bench (CPU)", "info")
    ]
    rows.append({"stage": "bench (CUDA, PyTorch)", "usable": "yes" if gpu else "no", "needs": "a CUDA GPU and a CUDA build of torch"})
    ort_cuda = "CUDAExecutionProvider" in machine.ort_providers
    rows.append(
        {"stage": "bench (CUDA, ONNX Runtime)", "usable": "yes" if gpu and ort_cuda else "no", "needs": "pip install onnxruntime-gpu (instead of onnxruntime)"}
    )
    for stage in ("build", "bench (TensorRT)"):
        missing = [] if trt else [INSTALL_TENSORRT]
        if not gpu:
            missing.append("a CUDA GPU")
        rows.append({"stage": stage, "usable": "no" if missing else "yes", "needs": "; ".join(missing) or "TensorRT and a GPU (present)"})
    return rows
