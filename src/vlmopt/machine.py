"""What this machine can run: torch and CUDA, GPUs, ONNX Runtime providers, TensorRT. Used by `doctor`, `build` and the GPU runners."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlmopt.errors import VlmoptError
from vlmopt.versions import package_version

INSTALL_TENSORRT = "pip install 'vlmopt[tensorrt]'"
INSTALL_OPENVINO = "pip install 'vlmopt[openvino]'"


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
    openvino: OpenVINOInfo | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "torch": self.torch,
            "torch_cuda": self.torch_cuda,
            "gpus": [{**g.__dict__, "compute_capability": f"{g.compute_capability[0]}.{g.compute_capability[1]}"} for g in self.gpus],
            "onnxruntime": self.onnxruntime,
            "onnxruntime_providers": self.ort_providers,
            "tensorrt": self.tensorrt,
            "tensorrt_problem": self.tensorrt_problem,
            "openvino": self.openvino.to_json() if self.openvino else None,
        }


@dataclass
class OpenVINOInfo:
    """OpenVINO as `doctor` reports it: version and devices, or why it is unusable; the CPU's optimization capabilities (BF16, INT8 ...)."""

    version: str | None
    devices: list[str] = field(default_factory=list)
    cpu: str | None = None
    cpu_capabilities: list[str] = field(default_factory=list)
    #: the CPU's int8/bf16 instruction sets (from /proc/cpuinfo), what decides OpenVINO's kernels
    cpu_isa: list[str] = field(default_factory=list)
    #: the precision the CPU plugin runs float models in by default (bf16 on CPUs with AVX512_BF16 or AMX)
    cpu_default_precision: str | None = None
    nncf: str | None = None
    problem: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def tensorrt_status() -> tuple[str | None, str | None]:
    """(version, None) when `import tensorrt` works, else (None, why not)."""
    try:
        import tensorrt
    except ImportError:
        return None, f"TensorRT is not installed ({INSTALL_TENSORRT})"
    except OSError as exc:  # the wheel is there but its CUDA libraries are not
        return None, f"TensorRT is installed but cannot load its libraries: {str(exc).splitlines()[0][:160]}"
    return tensorrt.__version__, None


def type_name(value: Any) -> str:
    """An OpenVINO element type as its short name: f32, bf16, i8 ..."""
    name = getattr(value, "get_type_name", None)
    return name() if callable(name) else str(value)


def require_openvino(purpose: str = "vlmopt openvino") -> Any:
    """The `openvino` module, or one line naming the extra that installs it."""
    try:
        import openvino
    except ImportError:
        raise VlmoptError(f"{purpose} needs OpenVINO, which is not installed: {INSTALL_OPENVINO}") from None
    return openvino


def require_nncf(purpose: str) -> Any:
    try:
        import nncf
    except ImportError:
        raise VlmoptError(f"{purpose} needs NNCF, which is not installed: {INSTALL_OPENVINO}") from None
    return nncf


def check_openvino_device(core: Any, device: str) -> None:
    """Refuse a device name OpenVINO does not know on this machine, listing those it does."""
    devices = list(core.available_devices)
    if device not in devices:
        raise VlmoptError(
            f"OpenVINO has no device '{device}' on this machine (it has {', '.join(devices) or 'none'}); use --device {devices[0] if devices else 'CPU'}"
        )


#: the instruction sets that decide int8 and bf16 speed on x86 CPUs
_ISA = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16", "amx_fp16")


def cpu_isa() -> list[str]:
    """The int8/bf16-relevant instruction sets this CPU has (Linux: /proc/cpuinfo; elsewhere none)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return []
    return [isa for isa in _ISA if isa in flags]


def int8_sums_saturate() -> bool:
    """ONNX Runtime's x86 u8s8 int8 kernels add uint8 x int8 pairs into int16 (VPMADDUBSW) where the CPU has no
    VNNI, and those sums saturate with full 8-bit weights: measured on an AVX2-only AMD EPYC, the tiny LLaVA's
    int8 vision tower fell to cosine 0.981 against fp32, and 0.9995 with 7-bit weights. CPUs with
    AVX512-VNNI, AVX-VNNI or AMX add into int32 and lose nothing."""
    isa = cpu_isa()
    return "avx2" in isa and not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(isa)


def openvino_info() -> OpenVINOInfo:
    """OpenVINO's version, devices and CPU capabilities, without failing when it is missing or broken."""
    try:
        import openvino as ov
    except ImportError:
        return OpenVINOInfo(None, problem=f"OpenVINO is not installed ({INSTALL_OPENVINO})")
    info = OpenVINOInfo(ov.get_version().split("-")[0], nncf=package_version("nncf"), cpu_isa=cpu_isa())
    try:
        core = ov.Core()
        info.devices = list(core.available_devices)
        if "CPU" in info.devices:
            info.cpu = str(core.get_property("CPU", "FULL_DEVICE_NAME"))
            info.cpu_capabilities = [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]
            info.cpu_default_precision = type_name(core.get_property("CPU", "INFERENCE_PRECISION_HINT"))
    except RuntimeError as exc:
        info.problem = f"OpenVINO {info.version} cannot list its devices: {str(exc).strip().splitlines()[-1][:160]}"
    return info


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
        openvino=openvino_info(),
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
    openvino = machine.openvino
    ov_ok = openvino is not None and openvino.version is not None and not openvino.problem
    for stage in ("openvino", "bench (OpenVINO)"):
        rows.append({"stage": stage, "usable": "yes" if ov_ok else "no", "needs": "OpenVINO and NNCF (installed)" if ov_ok else INSTALL_OPENVINO})
    for stage in ("build", "bench (TensorRT)"):
        missing = [] if trt else [INSTALL_TENSORRT]
        if not gpu:
            missing.append("a CUDA GPU")
        rows.append({"stage": stage, "usable": "no" if missing else "yes", "needs": "; ".join(missing) or "TensorRT and a GPU (present)"})
    return rows
