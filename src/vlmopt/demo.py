"""Built-in demo checkpoints: real architectures with random weights, buildable with no hub.

`build_demo_model(dest, "clip", "base")` writes what `save_pretrained` of openai/clip-vit-base-patch32
would (same architecture and sizes, random weights) plus a working byte-level BPE tokenizer and
image processor, so every stage runs offline. `tiny` sizes are for tests.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from vlmopt.errors import VlmoptError

DEMO_FAMILIES = ("clip", "siglip", "vit", "vit-classifier", "bert", "llava", "smolvlm", "idefics3", "gemma3")
SIZES = ("tiny", "base")
#: llava also has `small` (LLaVA-OneVision-0.5B's sizes); see `vlmopt.demo_llava`
LLAVA_SIZES = ("tiny", "base", "small")
#: smolvlm and idefics3 have `256m` (SmolVLM-256M's sizes) instead of `base`; see `vlmopt.demo_smolvlm`
SMOLVLM_SIZES = ("tiny", "256m")
#: gemma3 has `tiny` only; see `vlmopt.demo_gemma3`
GEMMA3_SIZES = ("tiny",)

_TINY = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}
_TINY_IMAGE = {"image_size": 32, "patch_size": 8}
# A small word list the demo tokenizer learns its merges from, so common words are single tokens.
_CORPUS = [
    "a",
    "photo",
    "of",
    "the",
    "cat",
    "dog",
    "car",
    "bird",
    "horse",
    "ship",
    "truck",
    "plane",
    "frog",
    "deer",
    "person",
    "people",
    "man",
    "woman",
    "child",
    "on",
    "in",
    "with",
    "and",
    "at",
    "near",
    "under",
    "over",
    "red",
    "blue",
    "green",
    "black",
    "white",
    "small",
    "large",
    "picture",
    "image",
    "drawing",
    "painting",
    "sketch",
    "close",
    "up",
    "view",
    "street",
    "city",
    "beach",
    "forest",
    "mountain",
    "river",
    "sky",
    "night",
    "day",
    "sunset",
    "food",
]


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def _learn_merges(words: list[str], budget: int) -> list[tuple[str, str]]:
    """Plain BPE: repeatedly merge the most frequent adjacent pair, CLIP-style with '</w>' word ends."""
    table = dict(zip(range(256), _bytes_to_unicode(), strict=True))
    vocab = Counter()
    for word in words:
        symbols = [table[b] for b in word.encode()]
        symbols[-1] += "</w>"
        vocab[tuple(symbols)] += 1
    merges: list[tuple[str, str]] = []
    while len(merges) < budget:
        pairs: Counter = Counter()
        for symbols, count in vocab.items():
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged: Counter = Counter()
        for symbols, count in vocab.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] += count
        vocab = merged
    return merges


def clip_tokenizer(vocab_size: int, max_length: int) -> Any:
    """A working CLIP BPE tokenizer: byte symbols, merges learned from a word list, specials at the top."""
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    merges = _learn_merges(_CORPUS, budget=min(400, vocab_size - len(vocab) - 2))
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab["<|startoftext|>"] = vocab_size - 2
    vocab["<|endoftext|>"] = vocab_size - 1
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def _clip(size: str) -> tuple[Any, Any]:
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    if size == "base":  # openai/clip-vit-base-patch32
        vision = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12, "image_size": 224, "patch_size": 32}
        text = {
            "hidden_size": 512,
            "intermediate_size": 2048,
            "num_attention_heads": 8,
            "num_hidden_layers": 12,
            "vocab_size": 49408,
            "max_position_embeddings": 77,
        }
        projection_dim = 512
    else:
        vision, text, projection_dim = {**_TINY, **_TINY_IMAGE}, {**_TINY, "vocab_size": 1024, "max_position_embeddings": 32}, 16
    text.update(bos_token_id=text["vocab_size"] - 2, eos_token_id=text["vocab_size"] - 1, pad_token_id=text["vocab_size"] - 1)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
    image = vision["image_size"]
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": image}, crop_size={"height": image, "width": image}),
        tokenizer=clip_tokenizer(text["vocab_size"], text["max_position_embeddings"]),
    )
    return CLIPModel(config), processor


def _siglip(size: str) -> tuple[Any, Any]:
    from transformers import SiglipConfig, SiglipModel

    if size == "base":  # google/siglip-base-patch16-224
        vision = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12, "image_size": 224, "patch_size": 16}
        text = {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_attention_heads": 12,
            "num_hidden_layers": 12,
            "vocab_size": 32000,
            "max_position_embeddings": 64,
        }
    else:
        vision, text = {**_TINY, **_TINY_IMAGE}, {**_TINY, "vocab_size": 1024, "max_position_embeddings": 16}
    text.update(pad_token_id=1, eos_token_id=1, bos_token_id=None)
    return SiglipModel(SiglipConfig(text_config=text, vision_config=vision)), None


def _vit(size: str, classifier: bool) -> tuple[Any, Any]:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil, ViTModel

    dims = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12, "image_size": 224, "patch_size": 16}
    config = ViTConfig(**(dims if size == "base" else {**_TINY, **_TINY_IMAGE}), num_labels=1000 if size == "base" else 5)
    model = ViTForImageClassification(config) if classifier else ViTModel(config)
    image = config.image_size
    return model, ViTImageProcessorPil(size={"height": image, "width": image})


def _bert(size: str) -> tuple[Any, Any]:
    from transformers import BertConfig, BertModel

    dims = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12, "vocab_size": 30522}
    config = BertConfig(**(dims if size == "base" else {**_TINY, "vocab_size": 1024, "max_position_embeddings": 64}))
    return BertModel(config), None


def build_demo_model(dest: str | Path, family: str = "clip", size: str = "tiny", seed: int = 0, language_model: str | None = None) -> Path:
    """Write a Hugging Face model folder (safetensors, config, preprocessing) with random weights.

    `language_model` (llava only): a real language model behind the random vision tower (see `vlmopt.demo_llava`)."""
    import torch

    if family not in DEMO_FAMILIES:
        raise VlmoptError(f"unknown demo family '{family}'; choose one of {', '.join(DEMO_FAMILIES)}")
    sizes = {"llava": LLAVA_SIZES, "smolvlm": SMOLVLM_SIZES, "idefics3": SMOLVLM_SIZES, "gemma3": GEMMA3_SIZES}.get(family, SIZES)
    if size not in sizes:
        raise VlmoptError(f"unknown demo size '{size}' for {family}; choose one of {', '.join(sizes)}")
    if language_model and family != "llava":
        raise VlmoptError(f"--language-model puts a language model behind a vision tower (--family llava), not into {family}")
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise VlmoptError(f"{dest} exists and is not an empty directory")
    if family == "llava":
        from vlmopt.demo_llava import build_llava

        build_llava(dest, size, seed, language_model)
        return dest
    if family in ("smolvlm", "idefics3"):
        from vlmopt.demo_smolvlm import build_smolvlm

        build_smolvlm(dest, size, seed, model_type=family)
        return dest
    if family == "gemma3":
        from vlmopt.demo_gemma3 import build_gemma3

        build_gemma3(dest, size, seed)
        return dest
    torch.manual_seed(seed)
    builders = {
        "clip": lambda: _clip(size),
        "siglip": lambda: _siglip(size),
        "vit": lambda: _vit(size, classifier=False),
        "vit-classifier": lambda: _vit(size, classifier=True),
        "bert": lambda: _bert(size),
    }
    model, processor = builders[family]()
    dest.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(dest)
    if processor is not None:
        processor.save_pretrained(dest)
    return dest
