"""What a model directory holds, and the state of each artifact: the one rule `info`, recipes and reports share.

It lives below `vlmopt.api` (which re-exports it) so that the report, which the API also offers, can use it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from vlmopt.stages import STAGES
from vlmopt.workspace import Artifact, ModelDir, environment_changes


@dataclass
class ArtifactStatus:
    """An artifact and its state: `ok`, `modified: ...` (files changed or missing) or `stale: ...` (why it would be re-made)."""

    artifact: Artifact
    status: str

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def status(model_dir: ModelDir, artifact: Artifact, artifacts: dict[str, Artifact], hashes: bool = False) -> str:
    """`ok`, `modified: ...` or `stale: ...`: the one rule `info`, recipes and reports share."""
    problems = model_dir.check_files(artifact, hashes=hashes)
    if problems:
        return "modified: " + "; ".join(problems)
    if artifact.parent is not None:
        parent = artifacts.get(artifact.parent)
        if parent is None:
            return f"stale: its parent '{artifact.parent}' is gone"
        if parent.digest != artifact.parent_digest:
            return f"stale: its parent '{artifact.parent}' changed"
    stage = next((s for s in STAGES if s.name == artifact.stage), None)
    if stage is not None and artifact.environment:
        changed = environment_changes(artifact.environment, {k: v for k, v in stage.environment(None).items() if k in artifact.environment})
        if changed:
            return "stale: made with " + ", ".join(changed)
    return "ok"


def info(directory: str | os.PathLike[str], verify: bool = False, warn: Callable[[str], None] | None = None) -> tuple[ModelDir, list[ArtifactStatus]]:
    """The model directory and each artifact with its status; `verify` re-hashes every file.

    First settles what a killed or interrupted command left (when no other vlmopt process holds the
    directory); `warn` hears why it could not."""
    model_dir = ModelDir.open(directory)
    unsettled = model_dir.try_recover()
    if unsettled and warn is not None:
        warn(f"an interrupted command left {model_dir.path} unsettled, and it cannot be settled now: {unsettled}")
    artifacts = model_dir.load()
    return model_dir, [ArtifactStatus(a, status(model_dir, a, artifacts, hashes=verify)) for a in artifacts.values()]
