"""The model directory: its manifest (`vlmopt.json`), its lock, and atomic artifact commits.

Every stage goes through `ModelDir.produce`, the one place that knows how an artifact is written:
into a temporary folder beside its final place, verified there, renamed into place, and only then
recorded in the manifest. A failure at any point leaves the directory and manifest as they were.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

from vlmopt.errors import VlmoptError
from vlmopt.records import Recommendation, TowerRecord, Traits, Verification
from vlmopt.versions import tool_versions

MANIFEST_NAME = "vlmopt.json"
LOCK_NAME = ".vlmopt.lock"
SCHEMA_VERSION = 2
_ARTIFACT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: folders of the model directory that are not artifacts
RESERVED_NAMES = ("reports", "timing-caches")
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"


@dataclass
class FileRecord:
    path: str
    sha256: str
    size: int


@dataclass
class Artifact:
    """One entry of the manifest: a folder of the model directory and how it came to be.

    `options` and `environment` (the versions of the tools its stage depends on) together with the
    parent's digest are what made it: when any of them changes, the artifact is stale. `traits` say
    what its content is, `towers` its graphs, `record` what its stage did (read by nobody else)."""

    name: str
    kind: str
    stage: str
    options: dict[str, Any]
    parent: str | None
    parent_digest: str | None
    digest: str
    files: list[FileRecord]
    towers: dict[str, TowerRecord] = field(default_factory=dict)
    traits: Traits = field(default_factory=Traits)
    record: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    tools: dict[str, str] = field(default_factory=dict)
    created: str = ""
    verification: Verification | None = None
    benchmark: dict[str, Any] | None = None

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def tower_files(self, tower: str) -> list[FileRecord]:
        """The files of one tower: its graph and any external data beside it (an OpenVINO IR's `.bin` beside its `.xml`)."""
        stem = self.towers[tower].file or ""
        weights = stem[: -len(".xml")] + ".bin" if stem.endswith(".xml") else None
        return [f for f in self.files if f.path in (stem, weights) or f.path.startswith(stem + ".")]

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["files"] = [dataclasses.asdict(f) for f in self.files]
        data["towers"] = {name: record.to_json() for name, record in self.towers.items()}
        data["traits"] = self.traits.to_json()
        data["verification"] = self.verification.to_json() if self.verification else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Artifact:
        data = dict(data)
        data["files"] = [FileRecord(**f) for f in data.get("files", [])]
        data["towers"] = {name: TowerRecord.from_json(name, t) for name, t in (data.get("towers") or {}).items()}
        data["traits"] = Traits.from_json(data.get("traits") or {})
        data["verification"] = Verification.from_json(data["verification"]) if data.get("verification") else None
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class StageOutput:
    """What a stage's build function reports about the folder it wrote."""

    towers: dict[str, TowerRecord] = field(default_factory=dict)
    traits: Traits = field(default_factory=Traits)
    record: dict[str, Any] = field(default_factory=dict)
    verification: Verification | None = None


class Produced(NamedTuple):
    """What `ModelDir.produce` did: the artifact, and whether it was already up to date."""

    artifact: Artifact
    skipped: bool


def environment_changes(recorded: dict[str, str], current: dict[str, str]) -> list[str]:
    """'onnxruntime 1.30.0 (now 1.31.1)' for each tool whose recorded version differs from the current one."""
    return [f"{tool} {recorded.get(tool)} (now {current[tool]})" for tool in sorted(current) if recorded.get(tool) != current[tool]]


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_records(folder: Path) -> list[FileRecord]:
    records = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        records.append(FileRecord(rel, sha256_file(path), path.stat().st_size))
    return records


def content_digest(files: list[FileRecord]) -> str:
    digest = hashlib.sha256()
    for record in sorted(files, key=lambda r: r.path):
        digest.update(f"{record.path}\0{record.sha256}\n".encode())
    return digest.hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _normalized(options: dict[str, Any]) -> dict[str, Any]:
    """Options as they round-trip through JSON, so a stored and a fresh set compare equal."""
    return json.loads(json.dumps(options, sort_keys=True, default=str))


class ModelDir:
    """A model directory: artifacts in sub-folders, described by `vlmopt.json`."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_NAME

    # -- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> ModelDir:
        """An existing model directory; raises if there is none at `path`."""
        model_dir = cls(path)
        if not model_dir.path.is_dir():
            raise VlmoptError(f"model directory {model_dir.path} does not exist; create it with `vlmopt export SOURCE -o {model_dir.path}`")
        if not model_dir.manifest_path.is_file():
            raise VlmoptError(
                f"{model_dir.path} is not a vlmopt model directory (no {MANIFEST_NAME}); create one with `vlmopt export SOURCE -o {model_dir.path}`"
            )
        model_dir.load()
        return model_dir

    @classmethod
    def create(cls, path: str | os.PathLike[str]) -> ModelDir:
        """A model directory at `path`, made empty if needed; an unrelated non-empty folder is refused."""
        model_dir = cls(path)
        if model_dir.path.exists() and not model_dir.path.is_dir():
            raise VlmoptError(f"{model_dir.path} exists and is not a directory")
        if model_dir.path.is_dir() and not model_dir.manifest_path.exists() and any(p.name != LOCK_NAME for p in model_dir.path.iterdir()):
            raise VlmoptError(f"{model_dir.path} is a non-empty directory that is not a vlmopt model directory; choose an empty or new folder")
        model_dir.path.mkdir(parents=True, exist_ok=True)
        return model_dir

    # -- manifest ------------------------------------------------------------------------
    def load(self) -> dict[str, Artifact]:
        if not self.manifest_path.exists():
            return {}
        try:
            data = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise VlmoptError(f"manifest {self.manifest_path} cannot be read ({exc}); restore it or start a new model directory") from exc
        version = data.get("schema_version") if isinstance(data, dict) else None
        if version != SCHEMA_VERSION:
            raise VlmoptError(
                f"manifest {self.manifest_path} has schema version {version!r}; this vlmopt reads version {SCHEMA_VERSION}: "
                f"re-create the model directory with `vlmopt export SOURCE -o {self.path}` in a new folder"
            )
        try:
            return {name: Artifact.from_json(entry) for name, entry in data["artifacts"].items()}
        except (KeyError, TypeError) as exc:
            raise VlmoptError(f"manifest {self.manifest_path} is malformed ({exc}); restore it or start a new model directory") from exc

    def recommendation(self) -> Recommendation | None:
        """What the last `bench` chose per tower and batch (the fastest artifact that passed its gate); None before any.

        `package` and `serve` deploy this choice by default."""
        data = self._manifest_data().get("recommendation")
        return Recommendation.from_json(data) if data else None

    def record_recommendation(self, recommendation: Recommendation) -> None:
        self._write_manifest(self.load(), recommendation=recommendation.to_json())

    def _manifest_data(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            return {}
        self.load()  # the checks on schema and form
        return json.loads(self.manifest_path.read_text())

    def _write_manifest(self, artifacts: dict[str, Artifact], recommendation: dict[str, Any] | None = None) -> None:
        """Write the manifest; the recorded recommendation is kept unless a new one is given."""
        from vlmopt import __version__

        data = {
            "schema_version": SCHEMA_VERSION,
            "vlmopt_version": __version__,
            "artifacts": {name: artifacts[name].to_json() for name in sorted(artifacts)},
        }
        kept = recommendation if recommendation is not None else self._manifest_data().get("recommendation")
        if kept is not None:
            data["recommendation"] = kept
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".json", dir=self.path)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh, indent=2, sort_keys=False)
                fh.write("\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.manifest_path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def artifacts(self) -> dict[str, Artifact]:
        return self.load()

    def artifact(self, name: str) -> Artifact:
        artifacts = self.load()
        if name not in artifacts:
            known = ", ".join(sorted(artifacts)) or "none"
            raise VlmoptError(f"no artifact named '{name}' in {self.path} (artifacts here: {known})")
        return artifacts[name]

    def artifact_path(self, name: str) -> Path:
        return self.path / name

    def update_artifact(self, name: str, **fields: Any) -> Artifact:
        """Change recorded fields (benchmark results, say) of an existing artifact."""
        artifacts = self.load()
        artifact = artifacts[name]
        for key, value in fields.items():
            setattr(artifact, key, value)
        self._write_manifest(artifacts)
        return artifact

    def check_files(self, artifact: Artifact, hashes: bool = False) -> list[str]:
        """Problems with an artifact's files on disk: missing, resized or (with `hashes`) changed."""
        problems = []
        folder = self.artifact_path(artifact.name)
        for record in artifact.files:
            path = folder / record.path
            if not path.is_file():
                problems.append(f"{record.path} is missing")
            elif path.stat().st_size != record.size:
                problems.append(f"{record.path} changed size")
            elif hashes and sha256_file(path) != record.sha256:
                problems.append(f"{record.path} changed content")
        return problems

    # -- locking -------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the directory's write lock; a second vlmopt process gets a clear refusal."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                raise VlmoptError(f"{self.path} is in use by another vlmopt process (pid {holder}); wait for it to finish and run again") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            self._sweep_leftovers()
            yield
        finally:
            os.close(fd)

    def _sweep_leftovers(self) -> None:
        """Remove temporary folders a killed process left behind (only called under the lock)."""
        for entry in self.path.iterdir():
            if entry.name.startswith((_TMP_PREFIX, _OLD_PREFIX)):
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        entry.unlink()

    # -- producing artifacts -------------------------------------------------------------
    def staleness(self, name: str, stage: str, options: dict[str, Any], parent: Artifact | None, environment: dict[str, str] | None = None) -> str | None:
        """Why artifact `name` must be (re)made by `stage` with these options, parent and tool versions; None when it is up to date."""
        existing = self.load().get(name)
        if existing is None:
            return "not made yet"
        if existing.stage != stage:
            return f"made by `vlmopt {existing.stage}`"
        if existing.options != _normalized(options):
            changed = sorted(k for k in set(existing.options) | set(_normalized(options)) if existing.options.get(k) != _normalized(options).get(k))
            return f"options changed ({', '.join(changed)})"
        if existing.parent_digest != (parent.digest if parent else None):
            return f"parent '{parent.name if parent else existing.parent}' changed"
        changed_tools = environment_changes(existing.environment, environment or {})
        if changed_tools:
            return "made with " + ", ".join(changed_tools)
        problems = self.check_files(existing)
        if problems:
            return "files changed: " + "; ".join(problems)
        return None

    def up_to_date(self, name: str, stage: str, options: dict[str, Any], parent: Artifact | None, environment: dict[str, str] | None = None) -> Artifact | None:
        """The recorded artifact if it was made by this stage, options, parent and tool versions, with its files intact."""
        if self.staleness(name, stage, options, parent, environment) is not None:
            return None
        return self.load()[name]

    def check_artifact_name(self, name: str, stage: str) -> None:
        """Refuse names that are not plain folder names, are reserved, or belong to another stage's artifact."""
        if not _ARTIFACT_NAME.match(name) or name == MANIFEST_NAME or name in RESERVED_NAMES:
            raise VlmoptError(
                f"'{name}' cannot name an artifact: use letters, digits, '.', '_' and '-' (not starting with '.'), and not {', '.join(RESERVED_NAMES)}"
            )
        existing = self.load().get(name)
        if existing is not None and existing.stage != stage:
            raise VlmoptError(f"artifact '{name}' was made by `vlmopt {existing.stage}`; choose another name")

    def produce(
        self,
        name: str,
        *,
        kind: str,
        stage: str,
        options: dict[str, Any],
        parent: Artifact | None,
        build: Callable[[Path], StageOutput],
        force: bool = False,
        environment: dict[str, str] | None = None,
    ) -> Produced:
        """Make artifact `name` with `build(tmp_folder)`, atomically; skip when already up to date.

        `build` writes the artifact's files into the folder it is given and raises on failure
        (a `CheckFailed` when verification fails). Only when it returns is the folder renamed into
        place and the manifest updated; the caller must hold `lock()`.
        """
        self.check_artifact_name(name, stage)
        if not force:
            existing = self.up_to_date(name, stage, options, parent, environment)
            if existing is not None:
                return Produced(existing, skipped=True)

        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{name}-", dir=self.path))
        try:
            output = build(tmp)
            files = file_records(tmp)
            artifact = Artifact(
                name=name,
                kind=kind,
                stage=stage,
                options=_normalized(options),
                parent=parent.name if parent else None,
                parent_digest=parent.digest if parent else None,
                digest=content_digest(files),
                files=files,
                towers=output.towers,
                traits=output.traits,
                record=output.record,
                environment=dict(environment or {}),
                tools=tool_versions(),
                created=_now(),
                verification=output.verification,
            )
            self._commit(tmp, artifact)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return Produced(artifact, skipped=False)

    def _commit(self, tmp: Path, artifact: Artifact) -> None:
        artifacts = self.load()
        final = self.artifact_path(artifact.name)
        old = None
        if final.exists():
            old = self.path / f"{_OLD_PREFIX}{artifact.name}-{os.getpid()}"
            os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            if old is not None:
                os.replace(old, final)
            raise
        artifacts[artifact.name] = artifact
        try:
            self._write_manifest(artifacts)
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)
            if old is not None:
                os.replace(old, final)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
