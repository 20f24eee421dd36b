"""`vlmopt export`: a Hugging Face checkpoint (hub id or local folder) into `<dir>/hf/`, as safetensors."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmopt.options import StageOptions, option
from vlmopt.records import Traits
from vlmopt.stage import Job, Stage
from vlmopt.workspace import StageOutput, source_digest

ARTIFACT = "hf"


@dataclass
class ExportOptions(StageOptions):
    source: str = option(None, "A hub id (org/name) or a local Hugging Face model folder.", argument=True, metavar="SOURCE")
    revision: str | None = option(None, "Hub revision (branch, tag or commit).")
    trust_remote_code: bool = option(False, "Allow the checkpoint's own Python code to run (off by default).")

    def check(self) -> None:
        from vlmopt.errors import VlmoptError

        if not self.source:
            raise VlmoptError("export needs a SOURCE: a hub id (org/name) or a local Hugging Face model folder")


def _source_fingerprint(options: ExportOptions, local: Path | None, config: Any, output: Path) -> str:
    """What identifies the source's content: file hashes for a folder (without the model directory being
    written, when it lies inside the source), the resolved commit for the hub."""
    if local is not None:
        return source_digest(local, exclude=output)
    return getattr(config, "_commit_hash", None) or f"{options.source}@{options.revision or 'main'}"


def _copy_sentence_transformers_files(local: Path, dest: Path) -> list[str]:
    """Sentence-transformers checkpoints keep their pooling beside the model; keep it with it."""
    from vlmopt.families.bert import SENTENCE_TRANSFORMERS_FILES

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


class Export(Stage):
    name = "export"
    Options = ExportOptions
    produces = "hf"
    creates_directory = True
    tools = ("transformers", "safetensors")
    summary = "Save a checkpoint (safetensors weights, config, processor) into DIR/hf/."
    details = "Example: vlmopt export build/clip-src -o build/clip"

    def artifact_name(self, options: ExportOptions) -> str:
        return ARTIFACT

    def prepare(self, job: Job) -> None:
        from vlmopt.families import family_for
        from vlmopt.hf import check_source, load_config

        options: ExportOptions = job.options
        local = check_source(options.source)
        source = str(local.resolve()) if local is not None else options.source
        config = load_config(source, options.revision, options.trust_remote_code)
        job.state.update(local=local, source=source, config=config, family=family_for(config))
        job.recorded.update(source=source, source_fingerprint=_source_fingerprint(options, local, config, job.model_dir.path))

    def build(self, job: Job, tmp: Path) -> StageOutput:
        from vlmopt.hf import load_model, save_processors

        options: ExportOptions = job.options
        source, config, family, local = job.state["source"], job.state["config"], job.state["family"], job.state["local"]
        job.say(f"exporting {options.source}")
        model = load_model(
            source, config=config, family=family, revision=options.revision, trust_remote_code=options.trust_remote_code, attn_implementation=None
        )
        model.save_pretrained(tmp)
        del model
        processors = save_processors(source, tmp, options.revision, options.trust_remote_code)
        extras = _copy_sentence_transformers_files(local, tmp) if local is not None else []
        record = {
            "source": source,
            "revision": options.revision,
            "architectures": list(config.architectures or []),
            "processors": processors,
            "extra_files": extras,
        }
        return StageOutput(traits=Traits(family=family.name, model_type=config.model_type), record=record)


STAGE = Export()
