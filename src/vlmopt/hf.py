"""Loading Hugging Face checkpoints the safe way: safetensors only, remote code only when asked.

A local folder is only ever read locally (a `Path`, or a string naming an existing folder): a
missing artifact folder is an error, never a hub request.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from vlmopt.errors import VlmoptError
from vlmopt.families import Family, check_config_fields, family_for
from vlmopt.workspace import require_utf8_path

#: SOURCE prefix that always means a hub id, even where a local folder has the same first component
HUB_PREFIX = "hf://"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
log = logging.getLogger("vlmopt")
#: (checkpoint, --trust-remote-code) pairs already warned about, so one command warns once
_warned: set[tuple[str, bool]] = set()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def check_source(source: str) -> Path | None:
    """The local directory `source` names, or None for a hub id; raises for anything else.

    A SOURCE that does not exist is still taken as a local path (and refused as missing) when it
    looks like one: it starts with `.`, `/` or `~`, is not of the hub's `org/name` form, or its
    first component exists here (`models/clip-typo` beside a `models/` folder). `hf://org/name`
    is always a hub id.
    """
    if source.startswith(HUB_PREFIX):
        if not _HUB_ID.match(source[len(HUB_PREFIX) :]):
            raise VlmoptError(f"{source} is not a hub id (hf://org/name)")
        return None
    require_utf8_path(source)
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise VlmoptError(f"{source} is a file; SOURCE must be a Hugging Face model directory or a hub id")
        if not (path / "config.json").is_file():
            raise VlmoptError(f"{source} is not a Hugging Face model directory (no config.json in it)")
        return path
    first = source.split("/", 1)[0]
    if "/" in source and first and Path(first).expanduser().exists():
        raise VlmoptError(
            f"folder {source} does not exist ({first}/ is a local folder, so SOURCE is read as a path; write {HUB_PREFIX}{source} for the hub id)"
        )
    if source.startswith((".", "/", "~")) or not _HUB_ID.match(source):
        raise VlmoptError(f"{source} does not exist (SOURCE must be a Hugging Face model directory or a hub id like openai/clip-vit-base-patch32)")
    return None


def _where(source: str | Path) -> tuple[str, bool]:
    """What to hand `from_pretrained`, and whether it is a local folder (then read with local_files_only)."""
    if isinstance(source, Path):
        if not source.is_dir():
            raise VlmoptError(f"folder {source} does not exist")
        return str(source), True
    if source.startswith(HUB_PREFIX):
        return source[len(HUB_PREFIX) :], False
    return source, os.path.isdir(source)


def _builtin_model_type(name: str, local: bool, revision: str | None, trust_remote_code: bool) -> bool:
    """Whether the checkpoint's model type has transformers' own classes. Its own code (`auto_map`)
    is then never run, --trust-remote-code or not, because vlmopt's families are written against
    those classes; a warning says so."""
    from transformers import PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        config_dict, _ = PretrainedConfig.get_config_dict(name, revision=revision, local_files_only=local)
    except Exception:
        return False  # AutoConfig below reports what is wrong
    model_type = config_dict.get("model_type")
    builtin = isinstance(model_type, str) and model_type in CONFIG_MAPPING
    if builtin and config_dict.get("auto_map") and (name, trust_remote_code) not in _warned:
        _warned.add((name, trust_remote_code))
        ignored = "is not run, even with --trust-remote-code" if trust_remote_code else "is ignored"
        log.warning(f"{name} names its own code (auto_map in config.json); vlmopt uses transformers' built-in {model_type} classes and that code {ignored}")
    return builtin


def _trust(name: str, local: bool, revision: str | None, trust_remote_code: bool) -> bool:
    return trust_remote_code and not _builtin_model_type(name, local, revision, trust_remote_code)


def load_config(source: str | Path, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig

    name, local = _where(source)
    builtin = _builtin_model_type(name, local, revision, trust_remote_code)
    trust = trust_remote_code and not builtin
    try:
        config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust, local_files_only=local)
    except Exception as exc:
        if "trust_remote_code" in str(exc):
            raise VlmoptError(
                f"{source} needs its own Python code to load (auto_map in config.json); vlmopt runs a checkpoint's code only with --trust-remote-code"
            ) from exc
        raise VlmoptError(f"cannot read a model config from {source}: {_first_line(exc)}") from exc
    if builtin:
        from transformers import PretrainedConfig

        declared, _ = PretrainedConfig.get_config_dict(name, revision=revision, local_files_only=local)
        check_config_fields(config, declared, str(source))
    return config


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
    name, local = _where(source)
    if local:
        _check_weight_files(Path(name))
    trust = _trust(name, local, revision, trust_remote_code)
    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust, "use_safetensors": True, "dtype": torch.float32, "local_files_only": local}
    model_class = family.model_class(config)
    if attn_implementation == "sdpa" and not _supports_sdpa(model_class, config):
        attn_implementation = "eager"  # DeBERTa-v2, ConvNeXt: transformers has no SDPA path, eager is their fastest
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        # mismatched shapes come back in the loading info (to be named below), not as transformers' "see the report above"
        model, info = model_class.from_pretrained(name, config=config, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    except VlmoptError:
        raise
    except Exception as exc:
        raise VlmoptError(f"cannot load weights from {source}: {_first_line(exc)}") from exc
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        key, stored, expected = mismatched[0]
        raise VlmoptError(
            f"weights in {source} do not fit its config: {len(mismatched)} tensor(s) have another shape than the config makes "
            f"(e.g. {key}: {tuple(stored)} stored, {tuple(expected)} from config.json); a size in config.json (a vision or text "
            "hidden size) disagrees with the weights: fix config.json or export the checkpoint it came with"
        )
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        unused = unused_parameters(model.eval(), family, config, Path(name) if local else None)
        needed = [key for key in missing if key not in unused]
        if needed:
            shown = ", ".join(needed[:3])
            raise VlmoptError(
                f"weights in {source} do not match its config: {len(needed)} tensors that its exported outputs use are missing (e.g. {shown}); "
                "the checkpoint is incomplete or corrupt"
            )
        if (name, tuple(missing)) not in _warned_unused:
            _warned_unused.add((name, tuple(missing)))
            log.warning(
                f"{source} lacks {len(missing)} tensors that no exported output uses ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): "
                "they are left as initialized and never run"
            )
    return model.eval()


def _supports_sdpa(model_class: Any, config: Any) -> bool:
    """Whether transformers has an SDPA attention path for the class `model_class` (an auto class: what it picks) loads."""
    mapping = getattr(model_class, "_model_mapping", None)
    try:
        concrete = mapping[type(config)] if mapping is not None else model_class
    except KeyError:
        return True
    return bool(getattr(concrete, "_supports_sdpa", True))


#: (checkpoint, missing tensors) already warned about, so one command warns once
_warned_unused: set[tuple[str, tuple[str, ...]]] = set()


def unused_parameters(model: Any, family: Family, config: Any, folder: Path | None) -> set[str]:
    """The parameters no output of the family's towers depends on: those that get no gradient when every tower's
    outputs are back-propagated from small synthetic inputs (a BERT's pooler under mean pooling). A generative
    family's parts are not checked (every tensor counts as used)."""
    import torch

    from vlmopt.inputs import make_inputs, verification_sizes

    if family.generative:
        return set()
    params = dict(model.named_parameters())
    used: set[str] = set()
    for tower in family.towers(config, folder):
        module = tower.wrap(model)
        model.zero_grad(set_to_none=True)
        feed = make_inputs(tower, verification_sizes(tower)[0], seed=0)
        with torch.enable_grad():
            outputs = module(*[torch.from_numpy(feed[spec.name]) for spec in tower.inputs])
            outputs = outputs if isinstance(outputs, tuple | list) else (outputs,)
            total = sum(o.float().sum() for o in outputs if torch.is_tensor(o) and o.is_floating_point() and o.requires_grad)
            if torch.is_tensor(total):
                total.backward()
        used |= {n for n, p in params.items() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return set(params) - used


def placeholder_tokenizer(tokenizer: object) -> bool:
    """Whether a loaded tokenizer is transformers 5's stand-in for a checkpoint that ships none: a vocabulary of
    special tokens only, which makes every word unknown."""
    vocab = getattr(tokenizer, "get_vocab", None)
    if vocab is None:
        return False
    return len(vocab()) <= len(set(getattr(tokenizer, "all_special_tokens", [])))


def save_processors(source: str | Path, dest: Path, revision: str | None = None, trust_remote_code: bool = False) -> list[str]:
    """Save whatever preprocessing the checkpoint has (processor, tokenizer, image processor); return their kinds."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    name, local = _where(source)
    kwargs = {"revision": revision, "trust_remote_code": _trust(name, local, revision, trust_remote_code), "local_files_only": local}
    try:
        processor = AutoProcessor.from_pretrained(name, **kwargs)
    except Exception:
        processor = None
    if processor is not None and placeholder_tokenizer(processor):
        processor = None
    if processor is not None and (hasattr(processor, "tokenizer") or hasattr(processor, "image_processor")):
        processor.save_pretrained(dest)
        return [kind for kind in ("tokenizer", "image_processor") if getattr(processor, kind, None) is not None]
    saved = []
    for kind, loader in (("tokenizer", AutoTokenizer), ("image_processor", AutoImageProcessor)):
        try:
            loaded = loader.from_pretrained(name, **kwargs)
            if kind == "tokenizer" and placeholder_tokenizer(loaded):
                continue
            loaded.save_pretrained(dest)
            saved.append(kind)
        except Exception:
            continue
    if processor is None and saved:
        # a processor that cannot load here (LLaVA-OneVision's needs torchvision for its video processor) still has
        # settings its parts lack (image tokens per tile, aspect ratio): keep them beside the parts, as written
        settings = _processor_settings(name, revision, local)
        if settings is not None:
            shutil.copyfile(settings, dest / "processor_config.json")
    return saved


def _processor_settings(name: str, revision: str | None, local: bool) -> str | None:
    """The checkpoint's processor_config.json, or None where it has none."""
    from transformers.utils import cached_file

    try:
        return cached_file(name, "processor_config.json", revision=revision, local_files_only=local, _raise_exceptions_for_missing_entries=False)
    except Exception:
        return None
