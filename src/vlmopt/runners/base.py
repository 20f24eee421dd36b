"""The one interface every backend implements: load an artifact's tower, run a feed of named arrays."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class Runner(ABC):
    """Runs one tower. `run` takes and returns numpy arrays keyed by graph input/output names."""

    backend: str = ""

    def __init__(self, input_names: list[str], output_names: list[str]):
        self.input_names = input_names
        self.output_names = output_names

    @abstractmethod
    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the runner holds (sessions, device memory)."""
