"""Inputs that are always here, with no download: drawn test images, prompts, and a real English text."""

from __future__ import annotations

import hashlib
import platform
from typing import Any

import numpy as np

PROMPTS = (
    "Describe this image in one sentence.",
    "What colors do you see? Answer briefly, then explain what a color is.",
    "Write a short poem about the picture.",
    "What is in the picture?",
    "Tell me a story about this image.",
    "List three things you notice.",
)
#: where the real text comes from (`english_text`)
TEXT_SOURCE = "Python's pydoc_data/topics.py (the standard library's documentation topics, sorted by name)"


def sample_image(index: int, size: int = 256) -> Any:
    """A deterministic picture: a coloured background with six ellipses and rectangles."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(index)
    image = Image.new("RGB", (size, size), tuple(int(x) for x in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = (int(v) for v in rng.integers(0, size - 40, 2))
        box = [x0, y0, x0 + int(rng.integers(20, 120)), y0 + int(rng.integers(20, 120))]
        colour = tuple(int(x) for x in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return image


def english_text() -> str:
    """Real English prose that ships with every Python: the documentation topics of `pydoc` (465k characters)."""
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[name] for name in sorted(topics.topics))


def text_tokens(tokenizer: Any, count: int) -> tuple[np.ndarray, dict[str, Any]]:
    """The first `count` tokens of `english_text()`, and what identifies them (source, Python version, a hash of the ids)."""
    ids = np.asarray(tokenizer(english_text()[: count * 12], add_special_tokens=False)["input_ids"][:count], dtype=np.int64)
    identity = {
        "source": TEXT_SOURCE,
        "python": platform.python_version(),
        "tokens": int(len(ids)),
        "token_ids_sha256": hashlib.sha256(ids.tobytes()).hexdigest(),
    }
    return ids, identity
