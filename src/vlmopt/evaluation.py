"""Evaluation data: the real samples every verification runs on.

Built in (`vlmopt/data/`, see its README for sources and licences): 88 sentences in 13 languages,
40 query/passage pairs with 24 hard negatives, 16 class prompts and 10 photos. The user adds their own with
`--eval-images DIR` and `--eval-text FILE`. Everything goes through the model's own saved tokenizer
and image processor, so the verification sees what a deployment sees. A tower for which the model has
no tokenizer or image processor is verified on synthetic inputs only, and the record says why.

Per tower, `EvalData.towers[name]` holds the real sets (built-in and the user's, each its own
`RealSet`) and the task probes: zero-shot (images x captions) for dual encoders, retrieval (queries x
passages) for text encoders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlmopt.calibration import builtin, check_fits, encode_text, process_images, read_images, read_lines, saved_processors, text_padding
from vlmopt.errors import VlmoptError
from vlmopt.families import Tower
from vlmopt.workspace import ModelDir

#: samples per evaluation batch: real text padded to the longest row of its batch, as a deployment batches it
BATCH = 8
#: most samples read from the user's --eval-images / --eval-text
MAX_USER_SAMPLES = 256


def builtin_sentences() -> list[str]:
    return read_lines(builtin("sentences.txt"), "built-in", 10_000)


def builtin_captions() -> list[str]:
    return read_lines(builtin("captions.txt"), "built-in", 10_000)


def builtin_retrieval() -> tuple[list[str], list[str]]:
    """(queries, passages): passage i answers query i; after them come the hard negatives, passages that answer no query
    (near duplicates of an answer with the fact the query asks for changed, or on a neighbouring topic), so that a
    variant whose embeddings drift cannot keep every top-1."""
    rows = [json.loads(line) for line in builtin("retrieval.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["query"] for r in rows], [r["document"] for r in rows] + [n for r in rows for n in r.get("negatives", [])]


@dataclass
class RealSet:
    """Real samples of one origin for one tower, batched."""

    source: str
    feeds: list[dict[str, np.ndarray]]


@dataclass
class TowerData:
    """What a tower is verified on: its real sets, or why it has none; and the task probes it takes part in."""

    real: list[RealSet] = field(default_factory=list)
    #: why there is no real data for this tower (then its synthetic figures are the gated ones)
    missing: str | None = None
    #: dual encoders: this tower's side of the zero-shot check (images, or the captions), as batches
    zero_shot: list[dict[str, np.ndarray]] | None = None
    zero_shot_source: str = ""
    #: text encoders: (queries, passages) as batches, for the retrieval check
    retrieval: tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]] | None = None


@dataclass
class EvalData:
    """The evaluation data of every tower a stage verifies."""

    towers: dict[str, TowerData] = field(default_factory=dict)

    def for_tower(self, tower: Tower) -> TowerData:
        return self.towers.get(tower.name) or TowerData(missing="no evaluation data was prepared for it")


#: the input roles of an encoder's text tower: what a tokenizer's output fills
TEXT_ROLES = {"input_ids", "attention_mask", "token_type_ids"}


def _role(tower: Tower) -> str:
    """image, text, pair (a one-graph dual encoder), or other: a part real data cannot be fed to as is (a generative
    model's embedding or decoder part, whose inputs are image features, embeddings and a KV cache; a bare language
    model's embedding part too, which takes token ids but gives one row per token, not a text embedding to rank by)."""
    if tower.meta.get("part"):
        return "other"
    roles = {spec.role for spec in tower.inputs}
    if roles == {"image"}:
        return "image"
    if "image" in roles and roles <= {"image"} | TEXT_ROLES:
        return "pair"
    return "text" if tower.vocab is not None and roles <= TEXT_ROLES else "other"


def _fixed_batch(tower: Tower) -> int | None:
    """The batch size of a static export, else None."""
    size = tower.inputs[0].shape[0]
    return size if isinstance(size, int) else None


def _fixed_sequence(tower: Tower) -> int | None:
    """The text length of a static export, else None."""
    ids = next((s for s in tower.inputs if s.role == "input_ids"), None)
    return ids.shape[1] if ids is not None and isinstance(ids.shape[1], int) else None


def _batches(count: int, tower: Tower) -> list[slice]:
    """Batches of BATCH samples; a static export takes whole batches of its own size only."""
    fixed = _fixed_batch(tower)
    size, stop = (fixed, count - count % fixed) if fixed else (BATCH, count)
    return [slice(i, min(i + size, stop)) for i in range(0, stop, size)]


def _text_feeds(lines: list[str], tokenizer: object, hf_dir: Path, tower: Tower, origin: str) -> list[dict[str, np.ndarray]]:
    length = _fixed_sequence(tower)
    padding: bool | str = "max_length" if length else text_padding(tower)
    feeds = []
    for part in _batches(len(lines), tower):
        feed = encode_text(lines[part], tokenizer, hf_dir, tower, origin, padding, length)
        check_fits(tower, feed, f"the tokenizer in {hf_dir}")
        feeds.append(feed)
    return feeds


def _image_feeds(pixel_values: np.ndarray, tower: Tower, hf_dir: Path) -> list[dict[str, np.ndarray]]:
    name = tower.inputs[0].name
    check_fits(tower, {name: pixel_values}, f"the image processor in {hf_dir}")
    return [{name: pixel_values[part]} for part in _batches(len(pixel_values), tower)]


def load_evaluation(model_dir: ModelDir, towers: dict[str, Tower], images: str | None, text: str | None) -> EvalData:
    """The evaluation data of `towers`: built in, plus the user's `images` folder and `text` file.

    Raises VlmoptError for user data the model cannot take (no such tower, no processor, unreadable files);
    built-in data that the model's processors cannot make falls back to synthetic inputs, said in `missing`."""
    image_towers = {n: t for n, t in towers.items() if _role(t) == "image"}
    text_towers = {n: t for n, t in towers.items() if _role(t) == "text"}
    pairs = {n: t for n, t in towers.items() if _role(t) == "pair"}
    if images and not image_towers and not pairs:
        raise VlmoptError(f"--eval-images was given, but this model has no image tower (it has {', '.join(towers)}); drop it")
    if text and not text_towers and not pairs:
        raise VlmoptError(f"--eval-text was given, but this model has no text tower (it has {', '.join(towers)}); drop it")
    user_images = read_images(Path(images), "--eval-images", MAX_USER_SAMPLES) if images else None
    user_lines = read_lines(Path(text), "--eval-text", MAX_USER_SAMPLES) if text else None

    hf = next((a for a in model_dir.load().values() if a.kind == "hf"), None)
    hf_dir = model_dir.artifact_path(hf.name) if hf is not None else None
    tokenizer, processor = saved_processors(hf_dir) if hf_dir is not None else (None, None)
    if user_images is not None and processor is None:
        raise VlmoptError(f"--eval-images needs the model's image processor, and {hf_dir} has none that loads; re-export from a checkpoint that ships one")
    if user_lines is not None and tokenizer is None:
        raise VlmoptError(f"--eval-text needs the model's tokenizer, and {hf_dir} has none that loads; re-export from a checkpoint that ships one")

    data = EvalData()
    assert hf_dir is not None or (tokenizer is None and processor is None)
    for name, tower in image_towers.items():
        data.towers[name] = _image_tower(tower, processor, hf_dir, user_images, images, dual=bool(text_towers))
    for name, tower in text_towers.items():
        data.towers[name] = _text_tower(tower, tokenizer, hf_dir, user_lines, text, dual=bool(image_towers))
    for name, tower in pairs.items():
        data.towers[name] = _pair_tower(tower, tokenizer, processor, hf_dir)
    return data


def _builtin_images() -> list:
    return read_images(builtin("images"), "built-in images", 10_000)


def _image_tower(tower: Tower, processor: object, hf_dir: Path | None, user: list | None, folder: str | None, dual: bool) -> TowerData:
    if processor is None:
        return TowerData(missing="the model has no image processor saved with it, so no real photo can be made into its input")
    assert hf_dir is not None
    data = TowerData()
    try:
        pixels = process_images(_builtin_images(), processor, hf_dir)
        data.real.append(RealSet("built-in photos", _image_feeds(pixels, tower, hf_dir)))
    except VlmoptError as exc:
        data.missing = f"the built-in photos do not fit it: {exc.message}"
        pixels = None
    if user:
        mine = process_images(user, processor, hf_dir)
        data.real.append(RealSet(f"your images {folder}", _image_feeds(mine, tower, hf_dir)))
        pixels = mine if pixels is None else np.concatenate([pixels, mine])
    if data.real:
        data.missing = None
    if dual and pixels is not None:
        data.zero_shot = _image_feeds(pixels, tower, hf_dir)
        data.zero_shot_source = f"{len(pixels)} real photos"
    return data


def _text_tower(tower: Tower, tokenizer: object, hf_dir: Path | None, user: list[str] | None, file: str | None, dual: bool) -> TowerData:
    if tokenizer is None:
        return TowerData(missing="the model has no tokenizer saved with it, so no real text can be made into its input")
    assert hf_dir is not None
    data = TowerData()
    try:
        sentences = builtin_sentences()
        data.real.append(RealSet("built-in sentences", _text_feeds(sentences, tokenizer, hf_dir, tower, "the built-in sentences")))
        if dual:
            captions = builtin_captions()
            data.zero_shot = _text_feeds(captions, tokenizer, hf_dir, tower, "the built-in captions")
            data.zero_shot_source = f"{len(captions)} captions"
        else:
            queries, passages = builtin_retrieval()
            data.retrieval = (
                _text_feeds(queries, tokenizer, hf_dir, tower, "the built-in queries"),
                _text_feeds(passages, tokenizer, hf_dir, tower, "the built-in passages"),
            )
    except VlmoptError as exc:
        data = TowerData(missing=f"the model's tokenizer cannot make the built-in text into its input: {exc.message}")
    if user:
        data.real.append(RealSet(f"your text {file}", _text_feeds(user, tokenizer, hf_dir, tower, str(file))))
        data.missing = None
    return data


def _pair_tower(tower: Tower, tokenizer: object, processor: object, hf_dir: Path | None) -> TowerData:
    """A one-graph dual encoder: the built-in photos against the captions, in one feed."""
    if tokenizer is None or processor is None:
        lacking = "tokenizer" if tokenizer is None else "image processor"
        return TowerData(missing=f"the model has no {lacking} saved with it, so no real input can be made")
    if _fixed_batch(tower) or _fixed_sequence(tower):
        return TowerData(missing="a fixed-shape graph of both towers takes no real photo and caption set")
    assert hf_dir is not None
    try:
        image_spec = next(s for s in tower.inputs if s.role == "image")
        pixels = process_images(_builtin_images(), processor, hf_dir)
        captions = builtin_captions()
        feed = {image_spec.name: pixels, **encode_text(captions, tokenizer, hf_dir, tower, "the built-in captions", text_padding(tower))}
        check_fits(tower, feed, f"the processors in {hf_dir}")
    except VlmoptError as exc:
        return TowerData(missing=f"the built-in data does not fit it: {exc.message}")
    return TowerData(real=[RealSet(f"built-in photos x captions ({len(pixels)} x {len(captions)})", [feed])], zero_shot=[feed], zero_shot_source="real")
