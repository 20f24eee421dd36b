"""Calibration and evaluation data: images through the saved image processor, prompts through the saved tokenizer.

Every problem a user can cause (an unreadable folder, a corrupt or oversized image, an empty
prompt file, data the model's inputs cannot take) is a `VlmoptError` naming the file and what to do.
When no data is given the caller falls back to synthetic inputs and must say so loudly.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlmopt.errors import VlmoptError
from vlmopt.families import Tower
from vlmopt.inputs import make_inputs
from vlmopt.workspace import ModelDir

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
#: decompression-bomb guard: Pillow's own default limit (a 9459 x 9459 image)
MAX_IMAGE_PIXELS = 89_478_485
#: samples per calibration batch
BATCH = 8


@dataclass
class CalibrationData:
    """Real samples per input role, or none; `sources` says where each tower's data came from."""

    pixel_values: np.ndarray | None = None
    text: dict[str, np.ndarray] | None = None
    image_files: int = 0
    prompts: int = 0
    sources: dict[str, str] = field(default_factory=dict)

    def for_tower(self, tower: Tower) -> dict[str, np.ndarray] | None:
        """The real samples for `tower` (all its inputs), or None when it needs synthetic data."""
        roles = {spec.role for spec in tower.inputs}
        feed: dict[str, np.ndarray] = {}
        for spec in tower.inputs:
            if spec.role == "image" and self.pixel_values is not None:
                feed[spec.name] = self.pixel_values
            elif spec.role in ("input_ids", "attention_mask", "token_type_ids") and self.text is not None and spec.name in self.text:
                feed[spec.name] = self.text[spec.name]
        if set(feed) != {spec.name for spec in tower.inputs} or ("image" in roles and len(roles) > 1):
            return None  # a monolith pairs images with prompts; its calibration stays synthetic
        return feed


def load_images(folder: Path, processor_dir: Path, limit: int) -> tuple[np.ndarray, int]:
    """`pixel_values` for up to `limit` images of `folder` (sorted by name), made by the saved image processor."""
    from PIL import Image, UnidentifiedImageError

    if not folder.is_dir():
        raise VlmoptError(f"--calib-images {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise VlmoptError(f"--calib-images {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); add some or drop the option")
    processor = _image_processor(processor_dir)
    images = []
    for path in files[:limit]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as image:
                    width, height = image.size
                    if width * height > MAX_IMAGE_PIXELS:
                        raise VlmoptError(
                            f"calibration image {path} is {width}x{height} pixels, above the {MAX_IMAGE_PIXELS / 1e6:.0f} MP limit "
                            "(decompression-bomb guard); resize it or remove it"
                        )
                    images.append(image.convert("RGB"))
        except VlmoptError:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise VlmoptError(f"calibration image {path} cannot be read ({str(exc).splitlines()[0][:120]}); fix or remove it") from exc
    try:
        pixel_values = np.asarray(processor(images=images, return_tensors="np")["pixel_values"], dtype=np.float32)
    except Exception as exc:
        raise VlmoptError(f"the image processor in {processor_dir} failed on the calibration images: {str(exc).splitlines()[0][:200]}") from exc
    return pixel_values, len(images)


def load_prompts(path: Path, tokenizer_dir: Path, tower: Tower, limit: int) -> tuple[dict[str, np.ndarray], int]:
    """Token ids (and attention mask) for up to `limit` non-blank lines of `path`, made by the saved tokenizer."""
    if not path.is_file():
        raise VlmoptError(f"--calib-text {path} is not a file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise VlmoptError(f"--calib-text {path} cannot be read as UTF-8 text ({exc})") from exc
    prompts = [line.strip() for line in lines if line.strip()][:limit]
    if not prompts:
        raise VlmoptError(f"--calib-text {path} has no prompts; write one prompt a line")
    tokenizer = _tokenizer(tokenizer_dir)
    max_length = tower.vocab.max_length if tower.vocab else None
    names = [spec.name for spec in tower.inputs]
    # Towers without an attention mask (SigLIP) were trained on text padded to the full length.
    padding = "max_length" if "attention_mask" not in names else True
    try:
        encoded = tokenizer(prompts, padding=padding, truncation=True, max_length=max_length, return_tensors="np")
    except Exception as exc:
        raise VlmoptError(f"the tokenizer in {tokenizer_dir} failed on {path}: {str(exc).splitlines()[0][:200]}") from exc
    missing = [n for n in names if n not in encoded]
    if missing:
        raise VlmoptError(f"the tokenizer in {tokenizer_dir} makes {sorted(encoded)}, but the {tower.name} tower takes {names}")
    text = {n: np.asarray(encoded[n], dtype=np.int64) for n in names}
    if tower.vocab and int(text["input_ids"].max()) >= tower.vocab.vocab_size:
        raise VlmoptError(
            f"the tokenizer in {tokenizer_dir} makes token id {int(text['input_ids'].max())}, beyond the {tower.name} tower's "
            f"vocabulary of {tower.vocab.vocab_size}; the tokenizer does not belong to this model"
        )
    return text, len(prompts)


def check_fits(tower: Tower, feed: dict[str, np.ndarray], origin: str) -> None:
    """Refuse data whose fixed dimensions differ from the tower's (say a 336-pixel processor for a 224-pixel model)."""
    for spec in tower.inputs:
        shape = feed[spec.name].shape
        fixed = [(i, d) for i, d in enumerate(spec.shape) if isinstance(d, int)]
        if len(shape) != len(spec.shape) or any(shape[i] != d for i, d in fixed):
            expected = "x".join(str(d) if isinstance(d, int) else d for d in spec.shape)
            raise VlmoptError(f"{origin} gives {spec.name} of shape {'x'.join(map(str, shape))}; the {tower.name} tower takes {expected}")


def data_digest(images: str | None, text: str | None) -> str | None:
    """What the calibration files hold, recorded with a stage's options so changed images or prompts re-run it."""
    paths: list[Path] = []
    if images and Path(images).is_dir():
        paths += sorted(p for p in Path(images).iterdir() if p.is_file())
    if text and Path(text).is_file():
        paths.append(Path(text))
    if not paths:
        return None
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def load_calibration(model_dir: ModelDir, towers: dict[str, Tower], images: str | None, text: str | None, samples: int) -> CalibrationData:
    """The user's images and prompts (at most `samples` of each), checked against the towers that will take them."""
    data = CalibrationData()
    if not images and not text:
        return data
    hf_dir = _processor_dir(model_dir)
    image_towers = [t for t in towers.values() if [s.role for s in t.inputs] == ["image"]]
    text_towers = [t for t in towers.values() if t.vocab is not None and "image" not in {s.role for s in t.inputs}]
    if images:
        if not image_towers:
            raise VlmoptError("--calib-images was given, but this model has no image tower")
        data.pixel_values, data.image_files = load_images(Path(images), hf_dir, samples)
        for tower in image_towers:
            check_fits(tower, {tower.inputs[0].name: data.pixel_values}, f"the image processor in {hf_dir}")
    if text:
        if not text_towers:
            raise VlmoptError("--calib-text was given, but this model has no text tower")
        tower = text_towers[0]
        data.text, data.prompts = load_prompts(Path(text), hf_dir, tower, samples)
        check_fits(tower, data.text, f"the tokenizer in {hf_dir}")
    return data


def _processor_dir(model_dir: ModelDir) -> Path:
    hf = next((a for a in model_dir.load().values() if a.kind == "hf"), None)
    if hf is None:
        raise VlmoptError(f"calibration data needs the model's processor, and {model_dir.path} has no Hugging Face artifact")
    return model_dir.artifact_path(hf.name)


def calibration_feeds(tower: Tower, data: CalibrationData, samples: int) -> tuple[list[dict[str, np.ndarray]], str]:
    """Batches of the user's samples for `tower` ("real"), or of random ones ("synthetic") when it has none."""
    real = data.for_tower(tower)
    if real is not None:
        return batches(real, BATCH), "real"
    return synthetic_batches(tower, samples), "synthetic"


def synthetic_warning(tower: Tower, samples: int) -> str:
    """What every stage that calibrates says when a tower falls back to random inputs (the user must not miss it)."""
    flag = "--calib-images DIR" if tower.inputs[0].role == "image" else "--calib-text FILE"
    return (
        f"the {tower.name} tower is calibrated on SYNTHETIC random inputs ({samples} samples): "
        f"a fallback that can misplace the int8 ranges; pass {flag} with real data"
    )


def sample_count(feeds: list[dict[str, np.ndarray]]) -> int:
    return sum(len(next(iter(feed.values()))) for feed in feeds)


def batches(feed: dict[str, np.ndarray], size: int = BATCH) -> list[dict[str, np.ndarray]]:
    """Split a feed of N samples into batches of `size`."""
    n = len(next(iter(feed.values())))
    return [{k: v[i : i + size] for k, v in feed.items()} for i in range(0, n, size)]


def synthetic_batches(tower: Tower, samples: int, seed: int = 1000) -> list[dict[str, np.ndarray]]:
    """Random inputs shaped like real ones (the fallback when no calibration data is given)."""
    sizes = {"batch": BATCH, "image_batch": BATCH, "text_batch": BATCH, "sequence": tower.vocab.max_length if tower.vocab else 1}
    count = max(1, -(-samples // BATCH))
    return [make_inputs(tower, sizes, seed=seed + i) for i in range(count)]


def _image_processor(path: Path):
    from transformers import AutoImageProcessor

    return _saved(AutoImageProcessor, path, "--calib-images", "image processor", "preprocessor_config.json")


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    return _saved(AutoTokenizer, path, "--calib-text", "tokenizer", "its tokenizer files")


def _saved(auto_class, path: Path, option: str, what: str, files: str):
    """A processor saved beside the weights (never fetched: `local_files_only`)."""
    try:
        return auto_class.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise VlmoptError(f"{option} needs the model's {what}, and {path} has none that loads; re-export from a checkpoint that ships {files}") from exc
