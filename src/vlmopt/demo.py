"""Built-in demo checkpoints: real architectures with random weights, buildable with no hub.

`build_demo_model(dest, "clip", "base")` writes what `save_pretrained` of openai/clip-vit-base-patch32
would (same architecture and sizes, random weights) plus a working byte-level BPE tokenizer and
image processor, so every stage runs offline. `tiny` sizes are for tests.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from vlmopt.demo_sizes import CORPUS as _CORPUS
from vlmopt.demo_sizes import TINY as _TINY
from vlmopt.demo_sizes import TINY_IMAGE as _TINY_IMAGE
from vlmopt.errors import VlmoptError

#: vision backbones: a feature extractor, and `<name>-classifier` an image classifier (`*ForImageClassification`)
VISION_BACKBONES = ("vit", "dinov2", "dinov2-registers", "deit", "beit", "swin", "convnext")
TEXT_ENCODERS = ("bert", "xlm-roberta", "deberta-v2", "modernbert", "nomic-bert")
DEMO_FAMILIES = (
    "clip",
    "siglip",
    *(f"{name}{kind}" for name in VISION_BACKBONES for kind in ("", "-classifier")),
    *TEXT_ENCODERS,
    "llava",
    "smolvlm",
    "idefics3",
    "gemma3",
    "llava_next",
    "llava_onevision",
    "qwen2_5_vl",
    "blip",
    "blip-retrieval",
    "llama",
    "qwen2",
    "mistral",
    "gemma3-text",
)
SIZES = ("tiny", "base")
#: llava also has `small` (LLaVA-OneVision-0.5B's sizes); see `vlmopt.demo_llava`
LLAVA_SIZES = ("tiny", "base", "small")
#: smolvlm and idefics3 have `256m` (SmolVLM-256M's sizes) instead of `base`; see `vlmopt.demo_smolvlm`
SMOLVLM_SIZES = ("tiny", "256m")
#: gemma3 has `tiny` only; see `vlmopt.demo_gemma3`
GEMMA3_SIZES = ("tiny",)
#: llava_next and llava_onevision have `tiny` only; see `vlmopt.demo_llava_next`
LLAVA_NEXT_SIZES = ("tiny",)
#: qwen2_5_vl has `tiny`, `3b` (Qwen2.5-VL-3B's sizes) and `3b-4l` (its widths, 4 layers a part), for timing; see `vlmopt.demo_qwen2_5_vl`
QWEN2_5_VL_SIZES = ("tiny", "3b", "3b-4l")
#: blip has `tiny` only; see `vlmopt.demo_blip`
BLIP_SIZES = ("tiny",)


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


def _vision_backbone(name: str, size: str, classifier: bool) -> tuple[Any, Any]:
    """A vision backbone at its real size (`base`: the checkpoint named below) or tiny, with the image processor its
    real checkpoints ship."""
    import transformers

    tiny = {**_TINY, **_TINY_IMAGE}
    real_vit = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12, "image_size": 224, "patch_size": 16}
    # (config class, model class, classifier class, tiny config, base config)
    declared: dict[str, tuple[str, str, str, dict[str, Any], dict[str, Any]]] = {
        "vit": ("ViTConfig", "ViTModel", "ViTForImageClassification", tiny, real_vit),  # google/vit-base-patch16-224
        # facebook/dinov2-base: position embeddings for 518 px, interpolated to the 224 px its processor crops (tiny: 48 -> 32)
        "dinov2": (
            "Dinov2Config",
            "Dinov2Model",
            "Dinov2ForImageClassification",
            {**tiny, "image_size": 48},
            {**real_vit, "image_size": 518, "patch_size": 14},
        ),
        # facebook/dinov2-with-registers-base
        "dinov2-registers": (
            "Dinov2WithRegistersConfig",
            "Dinov2WithRegistersModel",
            "Dinov2WithRegistersForImageClassification",
            {**tiny, "image_size": 48, "num_register_tokens": 4},
            {**real_vit, "image_size": 518, "patch_size": 14, "num_register_tokens": 4},
        ),
        # facebook/deit-base-distilled-patch16-224: its classifiers average a class and a distillation head
        "deit": ("DeiTConfig", "DeiTModel", "DeiTForImageClassificationWithTeacher", tiny, real_vit),
        # microsoft/beit-base-patch16-224: relative position bias per layer, layer scale, mean pooling
        "beit": (
            "BeitConfig",
            "BeitModel",
            "BeitForImageClassification",
            {**tiny, "use_relative_position_bias": True, "use_absolute_position_embeddings": False, "layer_scale_init_value": 0.1},
            {**real_vit, "use_relative_position_bias": True, "use_absolute_position_embeddings": False, "layer_scale_init_value": 0.1},
        ),
        # microsoft/swin-tiny-patch4-window7-224 (Swin-T)
        "swin": (
            "SwinConfig",
            "SwinModel",
            "SwinForImageClassification",
            {"image_size": 32, "patch_size": 2, "embed_dim": 16, "depths": [1, 1], "num_heads": [2, 4], "window_size": 4},
            {"image_size": 224, "patch_size": 4, "embed_dim": 96, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24], "window_size": 7},
        ),
        # facebook/convnext-tiny-224 (ConvNeXt-T)
        "convnext": (
            "ConvNextConfig",
            "ConvNextModel",
            "ConvNextForImageClassification",
            {"image_size": 32, "patch_size": 4, "num_stages": 2, "hidden_sizes": [16, 32], "depths": [1, 1]},
            {"image_size": 224, "patch_size": 4, "hidden_sizes": [96, 192, 384, 768], "depths": [3, 3, 9, 3]},
        ),
    }
    config_class, model_class, classifier_class, tiny_dims, base_dims = declared[name]
    config = getattr(transformers, config_class)(**(base_dims if size == "base" else tiny_dims), num_labels=1000 if size == "base" else 5)
    model = getattr(transformers, classifier_class if classifier else model_class)(config)
    crop = (224 if size == "base" else 32) if name.startswith("dinov2") else config.image_size
    if name.startswith("dinov2"):  # BitImageProcessor, as facebook/dinov2-* ship: resize the short side, then crop
        processor = transformers.BitImageProcessorPil(size={"shortest_edge": crop * 8 // 7}, crop_size={"height": crop, "width": crop})
    else:
        processor = transformers.ViTImageProcessorPil(size={"height": crop, "width": crop})
    return model, processor


def _text_encoder(name: str, size: str) -> tuple[Any, Any]:
    """A text encoder at its real size (`base`: the checkpoint named below) or tiny; no tokenizer (synthetic verification)."""
    import transformers

    tiny = {**_TINY, "vocab_size": 1024, "max_position_embeddings": 64}
    real = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12}
    declared: dict[str, tuple[str, str, dict[str, Any], dict[str, Any]]] = {
        "bert": ("BertConfig", "BertModel", tiny, {**real, "vocab_size": 30522}),  # bert-base-uncased
        # FacebookAI/xlm-roberta-base: positions start after the padding index
        "xlm-roberta": (
            "XLMRobertaConfig",
            "XLMRobertaModel",
            {**tiny, "max_position_embeddings": 66, "pad_token_id": 1},
            {**real, "vocab_size": 250002, "max_position_embeddings": 514, "pad_token_id": 1},
        ),
        # microsoft/deberta-v3-base: relative positions in log buckets, no absolute positions, no token types
        "deberta-v2": (
            "DebertaV2Config",
            "DebertaV2Model",
            {
                **tiny,
                "relative_attention": True,
                "position_buckets": 16,
                "max_relative_positions": -1,
                "pos_att_type": ["p2c", "c2p"],
                "position_biased_input": False,
                "type_vocab_size": 0,
                "norm_rel_ebd": "layer_norm",
                "share_att_key": True,
            },
            {
                **real,
                "vocab_size": 128100,
                "max_position_embeddings": 512,
                "relative_attention": True,
                "position_buckets": 256,
                "max_relative_positions": -1,
                "pos_att_type": ["p2c", "c2p"],
                "position_biased_input": False,
                "type_vocab_size": 0,
                "norm_rel_ebd": "layer_norm",
                "share_att_key": True,
            },
        ),
        # answerdotai/ModernBERT-base: every third layer global, the others a sliding window (tiny: 16 of 64 positions)
        "modernbert": (
            "ModernBertConfig",
            "ModernBertModel",
            {
                **tiny,
                "num_hidden_layers": 3,
                "global_attn_every_n_layers": 3,
                "local_attention": 16,
                "pad_token_id": 3,
                "bos_token_id": 1,
                "eos_token_id": 2,
                "cls_token_id": 1,
                "sep_token_id": 2,
            },
            {
                **real,
                "intermediate_size": 1152,
                "num_hidden_layers": 22,
                "vocab_size": 50368,
                "max_position_embeddings": 8192,
                "global_attn_every_n_layers": 3,
                "local_attention": 128,
            },
        ),
        # nomic-ai/nomic-embed-text-v1.5: rotary positions, SwiGLU MLP, post-norm blocks
        "nomic-bert": ("NomicBertConfig", "NomicBertModel", tiny, {**real, "vocab_size": 30528, "max_position_embeddings": 2048}),
    }
    config_class, model_class, tiny_dims, base_dims = declared[name]
    config = getattr(transformers, config_class)(**(base_dims if size == "base" else tiny_dims))
    return getattr(transformers, model_class)(config), None


def build_demo_model(dest: str | Path, family: str = "clip", size: str = "tiny", seed: int = 0, language_model: str | None = None) -> Path:
    """Write a Hugging Face model folder (safetensors, config, preprocessing) with random weights.

    `language_model` (llava, and the causal LMs): a real language model behind the random vision tower (see
    `vlmopt.demo_llava`), or alone (`vlmopt.demo_causal_lm`)."""
    import torch

    if family not in DEMO_FAMILIES:
        raise VlmoptError(f"unknown demo family '{family}'; choose one of {', '.join(DEMO_FAMILIES)}")
    from vlmopt.demo_causal_lm import MODEL_TYPES as CAUSAL_LMS
    from vlmopt.demo_causal_lm import SIZES as CAUSAL_LM_SIZES

    sizes = {
        "llava": LLAVA_SIZES,
        "smolvlm": SMOLVLM_SIZES,
        "idefics3": SMOLVLM_SIZES,
        "gemma3": GEMMA3_SIZES,
        "llava_next": LLAVA_NEXT_SIZES,
        "llava_onevision": LLAVA_NEXT_SIZES,
        "qwen2_5_vl": QWEN2_5_VL_SIZES,
        "blip": BLIP_SIZES,
        "blip-retrieval": BLIP_SIZES,
        **dict.fromkeys(CAUSAL_LMS, CAUSAL_LM_SIZES),
    }.get(family, SIZES)
    if size not in sizes:
        raise VlmoptError(f"unknown demo size '{size}' for {family}; choose one of {', '.join(sizes)}")
    if language_model and family != "llava" and family not in CAUSAL_LMS:
        raise VlmoptError(
            f"--language-model puts a real language model behind a vision tower (--family llava) or alone ({', '.join(CAUSAL_LMS)}), not into {family}"
        )
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise VlmoptError(f"{dest} exists and is not an empty directory")
    if family == "llava":
        from vlmopt.demo_llava import build_llava

        build_llava(dest, size, seed, language_model)
        return dest
    if family in CAUSAL_LMS:
        from vlmopt.demo_causal_lm import build_causal_lm

        build_causal_lm(dest, family, size, seed, language_model)
        return dest
    if family in ("smolvlm", "idefics3"):
        from vlmopt.demo_smolvlm import build_smolvlm

        build_smolvlm(dest, size, seed, model_type=family)
        return dest
    if family == "gemma3":
        from vlmopt.demo_gemma3 import build_gemma3

        build_gemma3(dest, size, seed)
        return dest
    if family in ("llava_next", "llava_onevision"):
        from vlmopt.demo_llava_next import build_llava_next

        build_llava_next(dest, size, seed, model_type=family)
        return dest
    if family == "qwen2_5_vl":
        from vlmopt.demo_qwen2_5_vl import build_qwen2_5_vl

        build_qwen2_5_vl(dest, size, seed)
        return dest
    if family in ("blip", "blip-retrieval"):
        from vlmopt.demo_blip import build_blip

        build_blip(dest, size, seed, retrieval=family == "blip-retrieval")
        return dest
    torch.manual_seed(seed)
    if family in ("clip", "siglip"):
        model, processor = _clip(size) if family == "clip" else _siglip(size)
    elif family in TEXT_ENCODERS:
        model, processor = _text_encoder(family, size)
    else:
        model, processor = _vision_backbone(family.removesuffix("-classifier"), size, classifier=family.endswith("-classifier"))
    dest.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(dest)
    if processor is not None:
        processor.save_pretrained(dest)
    return dest
