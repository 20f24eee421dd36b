"""`vlmopt export`: a Hugging Face checkpoint (hub id or local folder) into `<dir>/hf/`, as safetensors."""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from vlmopt.families import family_for
from vlmopt.families.bert import SENTENCE_TRANSFORMERS_FILES
from vlmopt.hf import check_source, load_config, load_model, save_processors
from vlmopt.workspace import ModelDir, StageOutput, StageResult, content_digest, file_records

ARTIFACT = "hf"


@dataclass
class ExportOptions:
    source: str
    revision: str | None = None
    trust_remote_code: bool = False


def _source_fingerprint(options: ExportOptions, local: Path | None, config) -> str:
    """What identifies the source's content: file hashes for a folder, the resolved commit for the hub."""
    if local is not None:
        return content_digest(file_records(local))
    return getattr(config, "_commit_hash", None) or f"{options.source}@{options.revision or 'main'}"


def _copy_sentence_transformers_files(local: Path, dest: Path) -> list[str]:
    """Sentence-transformers checkpoints keep their pooling beside the model; keep it with it."""
    import json

    copied = []
    for name in SENTENCE_TRANSFORMERS_FILES:
        if (local / name).is_file():
            shutil.copy2(local / name, dest / name)
            copied.append(name)
    if (local / "modules.json").is_file():
        for module in json.loads((local / "modules.json").read_text()):
            folder = module.get("path") or ""
            if folder and (local / folder).is_dir():
                (dest / folder).mkdir(parents=True, exist_ok=True)
                for config in (local / folder).glob("*.json"):
                    shutil.copy2(config, dest / folder / config.name)
                    copied.append(f"{folder}/{config.name}")
    return copied


def run(model_dir: ModelDir, options: ExportOptions, force: bool = False) -> StageResult:
    """Load the checkpoint (safetensors only), check it against its config, and save it to `hf/`."""
    local = check_source(options.source)
    source = str(local.resolve()) if local is not None else options.source
    config = load_config(source, options.revision, options.trust_remote_code)
    family = family_for(config)
    recorded = {**asdict(options), "source": source, "source_fingerprint": _source_fingerprint(options, local, config)}

    def build(tmp: Path) -> StageOutput:
        model = load_model(
            source, config=config, family=family, revision=options.revision, trust_remote_code=options.trust_remote_code, attn_implementation=None
        )
        model.save_pretrained(tmp)
        del model
        processors = save_processors(source, tmp, options.revision, options.trust_remote_code)
        extras = _copy_sentence_transformers_files(local, tmp) if local is not None else []
        return StageOutput(
            meta={
                "family": family.name,
                "model_type": config.model_type,
                "architectures": list(config.architectures or []),
                "source": source,
                "revision": options.revision,
                "processors": processors,
                "extra_files": extras,
            }
        )

    return model_dir.produce(ARTIFACT, kind="hf", stage="export", options=recorded, parent=None, build=build, force=force)
