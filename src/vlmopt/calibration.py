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


def builtin(name: str) -> Path:
    """A file of vlmopt's built-in real data (photos, sentences, prose): what evaluation judges on and calibration reads."""
    from importlib import resources

    return Path(str(resources.files("vlmopt") / "data" / name))


def read_images(folder: Path, option: str, limit: int) -> list:
    """Up to `limit` images of `folder` (sorted by name) as RGB, every one checked: unreadable or oversized files are
    refused by name. `option` names the flag the folder came from, for the messages."""
    if not folder.is_dir():
        raise VlmoptError(f"{option} {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise VlmoptError(f"{option} {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); add some or drop the option")
    what = "calibration" if option.startswith("--calib") else "evaluation"
    return [read_image(path, what)[0] for path in files[:limit]]


def read_image(path: Path, what: str) -> tuple[object, str | None]:
    """One image as 8-bit RGB, refused (VlmoptError, naming `what` image and the path) when it cannot be read or is over
    the pixel limit; and how it was converted, where its mode was not RGB: grayscale, palette, CMYK and alpha images
    through Pillow's conversion, 16-bit ones scaled to 8 bits (Pillow's own conversion clips them to white)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise VlmoptError(
                        f"{what} image {path} is {width}x{height} pixels, above the {MAX_IMAGE_PIXELS / 1e6:.0f} MP limit "
                        "(decompression-bomb guard); resize it or remove it"
                    )
                mode = image.mode
                if mode == "RGB":
                    return image.convert("RGB"), None
                if mode.startswith("I"):  # 16-bit (or 32-bit integer) grayscale
                    values = np.asarray(image, dtype=np.float64)
                    top = 65535.0 if values.max() > 255 else 255.0
                    gray = Image.fromarray(np.clip(np.round(values / top * 255), 0, 255).astype(np.uint8))
                    return gray.convert("RGB"), f"{mode} -> RGB (scaled to 8 bits)"
                if mode == "F":
                    raise VlmoptError(f"{what} image {path} holds floating-point pixels (mode F); save it as an 8-bit RGB or grayscale image")
                return image.convert("RGB"), f"{mode} -> RGB"
    except VlmoptError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        found = str(exc).split("(")[1].split(")")[0] if "(" in str(exc) else "too many pixels"
        raise VlmoptError(
            f"{what} image {path} has {found}, above the {MAX_IMAGE_PIXELS / 1e6:.0f} MP limit (Pillow's decompression-bomb guard); resize it"
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise VlmoptError(f"{what} image {path} cannot be read ({str(exc).splitlines()[0][:120]}); fix or remove it") from exc


def process_images(images: list, processor: object, processor_dir: Path) -> np.ndarray:
    """`pixel_values` of `images`, made by the saved image processor."""
    try:
        return np.asarray(processor(images=images, return_tensors="np")["pixel_values"], dtype=np.float32)  # type: ignore[operator]
    except Exception as exc:
        raise VlmoptError(f"the image processor in {processor_dir} failed on the images: {str(exc).splitlines()[0][:200]}") from exc


def load_images(folder: Path, processor_dir: Path, limit: int) -> tuple[np.ndarray, int]:
    """`pixel_values` for up to `limit` images of `folder` (sorted by name), made by the saved image processor."""
    images = read_images(folder, "--calib-images", limit)
    return process_images(images, _image_processor(processor_dir), processor_dir), len(images)


def read_lines(path: Path, option: str, limit: int) -> list[str]:
    """Up to `limit` non-blank lines of a UTF-8 text file; an empty, unreadable or non-UTF-8 file is refused."""
    if not path.is_file():
        raise VlmoptError(f"{option} {path} is not a file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise VlmoptError(f"{option} {path} cannot be read as UTF-8 text ({exc})") from exc
    prompts = [line.strip() for line in lines if line.strip()][:limit]
    if not prompts:
        raise VlmoptError(f"{option} {path} has no prompts or sentences (only blank lines); write one a line")
    return prompts


def encode_text(
    prompts: list[str], tokenizer: object, tokenizer_dir: Path, tower: Tower, origin: str, padding: bool | str = True, length: int | None = None
) -> dict[str, np.ndarray]:
    """The tower's text inputs for `prompts`, made by the saved tokenizer (checked against the tower's vocabulary)."""
    max_length = length or (tower.vocab.max_length if tower.vocab else None)
    names = [spec.name for spec in tower.inputs if spec.role in ("input_ids", "attention_mask", "token_type_ids")]
    try:
        encoded = tokenizer(prompts, padding=padding, truncation=True, max_length=max_length, return_tensors="np")  # type: ignore[operator]
    except Exception as exc:
        raise VlmoptError(f"the tokenizer in {tokenizer_dir} failed on {origin}: {str(exc).splitlines()[0][:200]}") from exc
    missing = [n for n in names if n not in encoded]
    if missing:
        raise VlmoptError(f"the tokenizer in {tokenizer_dir} makes {sorted(encoded)}, but the {tower.name} tower takes {names}")
    text = {n: np.asarray(encoded[n], dtype=np.int64) for n in names}
    if tower.vocab and int(text["input_ids"].max()) >= tower.vocab.vocab_size:
        raise VlmoptError(
            f"the tokenizer in {tokenizer_dir} makes token id {int(text['input_ids'].max())}, beyond the {tower.name} tower's "
            f"vocabulary of {tower.vocab.vocab_size}; the tokenizer does not belong to this model"
        )
    return text


def text_padding(tower: Tower) -> bool | str:
    """Towers without an attention mask (SigLIP) were trained on text padded to the full length."""
    return "max_length" if "attention_mask" not in [spec.name for spec in tower.inputs] else True


def load_prompts(path: Path, tokenizer_dir: Path, tower: Tower, limit: int) -> tuple[dict[str, np.ndarray], int]:
    """Token ids (and attention mask) for up to `limit` non-blank lines of `path`, made by the saved tokenizer.

    Padded to the longest line of the file: ONNX Runtime's histogram calibrators need one shape for every batch."""
    prompts = read_lines(path, "--calib-text", limit)
    text = encode_text(prompts, _tokenizer(tokenizer_dir), tokenizer_dir, tower, str(path), text_padding(tower))
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


def load_calibration(
    model_dir: ModelDir, towers: dict[str, Tower], images: str | None, text: str | None, samples: int, builtin: bool = False
) -> CalibrationData:
    """The user's images and prompts (at most `samples` of each), checked against the towers that will take them.

    With `builtin`, a role the user gives nothing for is calibrated on vlmopt's own real data through the model's saved
    processors: the built-in photos, and English prose (`data/perplexity.txt`, which no encoder gate reads, so the
    gate's sentences are not the calibration's). A model without the processor keeps synthetic inputs for that role."""
    data = CalibrationData()
    if not images and not text and not builtin:
        return data
    image_towers = [t for t in towers.values() if [s.role for s in t.inputs] == ["image"]]
    text_towers = [t for t in towers.values() if t.vocab is not None and "image" not in {s.role for s in t.inputs}]
    if images and not image_towers:
        raise VlmoptError("--calib-images was given, but this model has no image tower")
    if text and not text_towers:
        raise VlmoptError("--calib-text was given, but this model has no text tower")
    if images or text:
        hf_dir = _processor_dir(model_dir)
    else:
        hf = next((a for a in model_dir.load().values() if a.kind == "hf"), None)
        if hf is None:
            return data
        hf_dir = model_dir.artifact_path(hf.name)
    if images:
        data.pixel_values, data.image_files = load_images(Path(images), hf_dir, samples)
        for tower in image_towers:
            check_fits(tower, {tower.inputs[0].name: data.pixel_values}, f"the image processor in {hf_dir}")
        data.sources["image"] = f"your images {images}"
    elif builtin and image_towers:
        _builtin_images(data, image_towers, hf_dir, samples)
    if text:
        tower = text_towers[0]
        data.text, data.prompts = load_prompts(Path(text), hf_dir, tower, samples)
        check_fits(tower, data.text, f"the tokenizer in {hf_dir}")
        data.sources["text"] = f"your text {text}"
    elif builtin and text_towers:
        _builtin_text(data, text_towers[0], hf_dir, samples)
    return data


#: the built-in calibration prose: English paragraphs no encoder verification reads (the decoder perplexity text)
BUILTIN_TEXT = "perplexity.txt"


def _builtin_images(data: CalibrationData, towers: list[Tower], hf_dir: Path, samples: int) -> None:
    try:
        processor = _image_processor(hf_dir)
    except VlmoptError:
        return
    try:
        pixels = process_images(read_images(builtin("images"), "built-in images", samples), processor, hf_dir)
        for tower in towers:
            check_fits(tower, {tower.inputs[0].name: pixels}, f"the image processor in {hf_dir}")
    except VlmoptError:
        return
    data.pixel_values, data.image_files = pixels, len(pixels)
    data.sources["image"] = "built-in photos"


def _builtin_text(data: CalibrationData, tower: Tower, hf_dir: Path, samples: int) -> None:
    try:
        tokenizer = _tokenizer(hf_dir)
        prompts = read_lines(builtin(BUILTIN_TEXT), "built-in", samples)
        text = encode_text(prompts, tokenizer, hf_dir, tower, "the built-in prose", text_padding(tower))
        check_fits(tower, text, f"the tokenizer in {hf_dir}")
    except VlmoptError:
        return
    data.text, data.prompts = text, len(prompts)
    data.sources["text"] = "built-in prose"


def calibration_source(tower: Tower, data: CalibrationData) -> str | None:
    """Where a tower's real calibration samples come from, or None when it has none."""
    return data.sources.get("image" if tower.inputs[0].role == "image" else "text")


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
    image = tower.inputs[0].role == "image"
    what = "image processor" if image else "tokenizer"
    return (
        f"the {tower.name} tower is calibrated on SYNTHETIC random inputs ({samples} samples): the model has no {what} saved with it "
        f"that makes vlmopt's built-in {'photos' if image else 'text'} into its input, and random inputs can misplace the int8 ranges; "
        "re-export from a checkpoint that ships one"
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


def _image_processor(path: Path, option: str = "--calib-images"):
    from transformers import AutoImageProcessor

    return _saved(AutoImageProcessor, path, option, "image processor", "preprocessor_config.json", IMAGE_PROCESSOR_FILES)


def _tokenizer(path: Path, option: str = "--calib-text"):
    from transformers import AutoTokenizer

    from vlmopt.hf import placeholder_tokenizer

    tokenizer = _saved(AutoTokenizer, path, option, "tokenizer", "its tokenizer files", TOKENIZER_FILES)
    if placeholder_tokenizer(tokenizer):
        raise VlmoptError(
            f"{option} needs the model's tokenizer, and {path} has only an empty one (special tokens, no vocabulary); "
            "re-export from a checkpoint that ships its tokenizer files"
        )
    return tokenizer


def saved_processors(path: Path) -> tuple[object | None, object | None]:
    """(tokenizer, image processor) saved beside the weights in `path`, each None where it has none that loads."""
    found = []
    for loader in (_tokenizer, _image_processor):
        try:
            found.append(loader(path))
        except VlmoptError:
            found.append(None)
    return found[0], found[1]


#: files one of which a saved tokenizer has: transformers 5 builds an empty tokenizer (specials only, every word
#: unknown) for a folder that has none, which would make "real" text into [UNK] rows
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def _saved(auto_class, path: Path, option: str, what: str, files: str, markers: tuple[str, ...]):
    """A processor saved beside the weights (never fetched: `local_files_only`), refused where none of its files is there."""
    if not any((path / name).is_file() for name in markers):
        raise VlmoptError(f"{option} needs the model's {what}, and {path} has none; re-export from a checkpoint that ships {files}")
    try:
        return auto_class.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise VlmoptError(f"{option} needs the model's {what}, and {path} has none that loads; re-export from a checkpoint that ships {files}") from exc
