from __future__ import annotations

import numpy as np

from vlmopt.runners.base import Runner


class TorchRunner(Runner):
    """A wrapped PyTorch tower (see `Tower.wrap`) run eagerly under `inference_mode`."""

    backend = "pytorch"

    def __init__(self, module, input_names: list[str], output_names: list[str]):
        super().__init__(input_names, output_names)
        self.module = module.eval()

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            outputs = self.module(*[torch.from_numpy(np.ascontiguousarray(feed[name])) for name in self.input_names])
        if not isinstance(outputs, tuple | list):
            outputs = (outputs,)
        return {name: out.float().numpy() for name, out in zip(self.output_names, outputs, strict=True)}

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.module.parameters())

    def close(self) -> None:
        self.module = None
