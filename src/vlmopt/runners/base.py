"""The one interface every backend implements: load an artifact's tower, run a feed of named arrays.

As in Polygraphy's runners, the public `run` checks the feed against the runner's own input names and
the backends implement only `run_impl`; runners are context managers that release what they hold.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from vlmopt.errors import VlmoptError


class Runner(ABC):
    """Runs one tower. `run` takes and returns numpy arrays keyed by graph input/output names."""

    backend: str = ""

    def __init__(self, input_names: list[str], output_names: list[str]):
        self.input_names = input_names
        self.output_names = output_names

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The outputs for `feed`, which must hold exactly the runner's inputs."""
        if set(feed) != set(self.input_names):
            missing = [n for n in self.input_names if n not in feed]
            extra = sorted(set(feed) - set(self.input_names))
            what = "; ".join(p for p in (f"missing {', '.join(missing)}" if missing else "", f"unknown {', '.join(extra)}" if extra else "") if p)
            raise VlmoptError(f"the {self.backend} runner takes inputs {', '.join(self.input_names)}; the feed has {what}")
        return self.run_impl(feed)

    @abstractmethod
    def run_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def details(self) -> dict | None:
        """What this runner actually runs beyond the artifact's file (OpenVINO: the precisions it executes), or None."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the runner holds (sessions, device memory)."""

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
