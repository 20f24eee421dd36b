from __future__ import annotations

import numpy as np

from vlmopt.runners.base import Runner


class TorchRunner(Runner):
    """A wrapped PyTorch tower (see `Tower.wrap`) run eagerly under `inference_mode`, on CPU or a CUDA device.

    Floating-point inputs are cast to `dtype` (fp16 on CUDA); outputs come back as float32 numpy arrays,
    which also synchronises the device, so a timed call includes the whole GPU run."""

    backend = "pytorch"

    def __init__(self, module, input_names: list[str], output_names: list[str], device: str = "cpu", dtype=None):
        import torch

        super().__init__(input_names, output_names)
        self.device = device
        self.dtype = dtype or torch.float32
        self.module = module.eval().to(device=device, dtype=self.dtype)

    def _tensor(self, value: np.ndarray):
        import torch

        tensor = torch.from_numpy(np.ascontiguousarray(value))
        if tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        return tensor.to(self.device)

    def run_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            outputs = self.module(*[self._tensor(feed[name]) for name in self.input_names])
        if not isinstance(outputs, tuple | list):
            outputs = (outputs,)
        return {name: out.float().cpu().numpy() for name, out in zip(self.output_names, outputs, strict=True)}

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.module.parameters())

    def close(self) -> None:
        self.module = None
