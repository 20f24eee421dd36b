"""Loading Hugging Face checkpoints the safe way: safetensors only, remote code only when asked."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from vlmopt.errors import VlmoptError
from vlmopt.families import Family, family_for

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def check_source(source: str) -> Path | None:
    """The local directory `source` names, or None for a hub id; raises for anything else."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise VlmoptError(f"{source} is a file; SOURCE must be a Hugging Face model directory or a hub id")
        if not (path / "config.json").is_file():
            raise VlmoptError(f"{source} is not a Hugging Face model directory (no config.json in it)")
        return path
    if source.startswith((".", "/", "~")) or not _HUB_ID.match(source):
        raise VlmoptError(f"{source} does not exist (SOURCE must be a Hugging Face model directory or a hub id like openai/clip-vit-base-patch32)")
    return None


def load_config(source: str | Path, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(source), revision=revision, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise VlmoptError(f"cannot read a model config from {source}: {_first_line(exc)}") from exc


def _check_weight_files(path: Path) -> None:
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise VlmoptError(f"{path} holds only pickled weights ({', '.join(pickles)}); vlmopt loads safetensors only. Convert them to safetensors first")
    raise VlmoptError(f"{path} has no weights (*.safetensors)")


def load_model(
    source: str | Path,
    *,
    config: Any | None = None,
    family: Family | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = "eager",
) -> Any:
    """The fp32 PyTorch model at `source` in eval mode, from safetensors; missing weights are an error.

    `attn_implementation="eager"` is the default because ONNX Runtime's optimizer fuses attention
    only in graphs exported from eager attention (SDPA exports fuse none).
    """
    import torch

    config = config if config is not None else load_config(source, revision, trust_remote_code)
    family = family or family_for(config)
    local = Path(source) if Path(source).is_dir() else None
    if local is not None:
        _check_weight_files(local)
    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code, "use_safetensors": True, "dtype": torch.float32}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model, info = family.model_class(config).from_pretrained(str(source), config=config, output_loading_info=True, **kwargs)
    except VlmoptError:
        raise
    except Exception as exc:
        raise VlmoptError(f"cannot load weights from {source}: {_first_line(exc)}") from exc
    missing = info.get("missing_keys") or []
    if missing:
        shown = ", ".join(sorted(missing)[:3])
        raise VlmoptError(
            f"weights in {source} do not match its config: {len(missing)} tensors missing (e.g. {shown}); the checkpoint is incomplete or corrupt"
        )
    return model.eval()


def save_processors(source: str | Path, dest: Path, revision: str | None = None, trust_remote_code: bool = False) -> list[str]:
    """Save whatever preprocessing the checkpoint has (processor, tokenizer, image processor); return their kinds."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    try:
        processor = AutoProcessor.from_pretrained(str(source), **kwargs)
    except Exception:
        processor = None
    if processor is not None and (hasattr(processor, "tokenizer") or hasattr(processor, "image_processor")):
        processor.save_pretrained(dest)
        return [kind for kind in ("tokenizer", "image_processor") if getattr(processor, kind, None) is not None]
    saved = []
    for kind, loader in (("tokenizer", AutoTokenizer), ("image_processor", AutoImageProcessor)):
        try:
            loader.from_pretrained(str(source), **kwargs).save_pretrained(dest)
            saved.append(kind)
        except Exception:
            continue
    return saved
