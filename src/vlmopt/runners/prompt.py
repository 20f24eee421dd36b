"""The prompt every generation backend is given, prepared once by a family's preprocessor."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Prompt:
    """Token ids with the image tokens expanded, the attention mask (left padding) and the pixels: identical for every backend."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    pixel_values: np.ndarray | None
    text: list[str]
    num_images: int
