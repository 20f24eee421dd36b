"""The model directory: its manifest (`vlmopt.json`), its lock, and crash-safe artifact commits.

Every stage goes through `ModelDir.produce`, the one place that knows how an artifact is written.
Under the directory's lock, a commit goes:

1. the stage writes into a staging folder `.tmp-NAME-*`; its files get the modes the umask
   allows and are fsynced, then its folders;
2. the new manifest is written beside the old one (`.tmp-*.json`) and fsynced;
3. a journal (`.vlmopt-journal.json`: the artifact, the staging folder, the backup name, the
   staged manifest and its sha256) is written, fsynced, renamed into place, the directory fsynced;
4. the recorded folder NAME, if any, is renamed to the backup `.old-NAME-*`, the staging folder to
   NAME, and the directory fsynced;
5. the staged manifest is renamed over `vlmopt.json` and the directory fsynced: the commit point;
6. the backup is removed, then the journal.

`recover` (run by every command that takes the lock, and by `info`) settles what a killed or
interrupted process left: with a journal, the artifact counts as committed exactly when
`vlmopt.json` has the journal's sha256; then the backup is removed (roll forward), otherwise NAME
is restored from the backup, or removed if it is new (roll back). Temporary files no journal
names are removed. Whatever the kill point, the directory ends in the state before the command
or the state after it.
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
import secrets
import shlex
import shutil
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

from vlmopt.errors import Interrupted, VlmoptError
from vlmopt.records import Recommendation, TowerRecord, Traits, Verification
from vlmopt.versions import tool_versions

MANIFEST_NAME = "vlmopt.json"
LOCK_NAME = ".vlmopt.lock"
JOURNAL_NAME = ".vlmopt-journal.json"
SCHEMA_VERSION = 2
MAX_NAME_LENGTH = 64
_ARTIFACT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
#: folders of the model directory that are not artifacts
RESERVED_NAMES = ("reports", "timing-caches", "checkpoints")
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SPACE_ERRORS = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded"}


@dataclass
class FileRecord:
    path: str
    sha256: str
    size: int
    #: modification time when recorded: a file with the recorded size and mtime is taken as unchanged without hashing
    mtime_ns: int | None = None


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
        """The files of one tower: its graph and any external data beside it (an OpenVINO IR's `.bin` beside its `.xml`),
        and a decoder's prompt graph with its data (`TowerRecord.prefill`)."""
        record = self.towers[tower]
        graphs = [g for g in (record.file or "", record.prefill) if g]
        weights = [g[: -len(".xml")] + ".bin" for g in graphs if g.endswith(".xml")]
        return [f for f in self.files if f.path in (*graphs, *weights) or any(f.path.startswith(g + ".") for g in graphs)]

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
        record_fields = {f.name for f in dataclasses.fields(FileRecord)}
        data["files"] = [FileRecord(**{k: v for k, v in f.items() if k in record_fields}) for f in data.get("files", [])]
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


def file_records(folder: Path, skip: Callable[[Path], bool] | None = None) -> list[FileRecord]:
    """Path, sha256, size and mtime of every file under `folder`; `skip(path)` leaves out files and whole folders."""
    records = []
    for root, dirs, names in os.walk(folder):
        base = Path(root)
        dirs[:] = [d for d in dirs if not (skip and skip(base / d))]
        for name in names:
            path = base / name
            if (skip and skip(path)) or not path.is_file():
                continue
            info = path.stat()
            records.append(FileRecord(path.relative_to(folder).as_posix(), sha256_file(path), info.st_size, info.st_mtime_ns))
    return sorted(records, key=lambda r: r.path)


def content_digest(files: list[FileRecord]) -> str:
    digest = hashlib.sha256()
    for record in sorted(files, key=lambda r: r.path):
        digest.update(f"{record.path}\0{record.sha256}\n".encode())
    return digest.hexdigest()


def source_digest(folder: Path, exclude: Path | None = None) -> str:
    """The content digest of a source folder, leaving out what vlmopt writes: model directories inside
    it (`exclude`, and any folder holding a manifest) and vlmopt's lock and temporary files."""
    excluded = exclude.resolve() if exclude is not None else None

    def skip(path: Path) -> bool:
        if _is_own(path.name):
            return True
        if path.is_dir():
            return (path / MANIFEST_NAME).is_file() or (excluded is not None and path.resolve() == excluded)
        return False

    return content_digest(file_records(folder, skip))


def write_atomically(path: Path, data: bytes) -> None:
    """Write `path` so that no reader ever sees it half-written: a temporary file beside it, fsynced, renamed over it.

    The file gets the modes the umask allows, like any file the user creates.
    """
    try:
        tmp = _write_tmp(path.parent, data, suffix=path.suffix)
    except OSError as exc:
        exc.filename = str(path)  # not the temporary name, which means nothing to the user
        raise
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)


def check_writable(folder: Path) -> None:
    """Raise, naming the reason, unless files can be written into `folder` (or, if it does not exist
    yet, into the nearest existing folder above it) and at least 1 MiB is free there."""
    probe_in = folder
    while not probe_in.exists() and probe_in != probe_in.parent:
        probe_in = probe_in.parent
    try:
        os.unlink(_write_tmp(probe_in, b"", suffix=".probe", sync=False))
        free = os.statvfs(probe_in)
    except OSError as exc:
        raise VlmoptError(f"cannot write to {folder} ({_reason(exc, probe_in)}); fix that and run again") from None
    if free.f_bavail * free.f_frsize < 2**20:
        raise VlmoptError(f"cannot write to {folder} (no space left on the device); free some space and run again")


def _reason(exc: OSError, path: Path) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and _read_only_fs(path):
        return "read-only file system"
    return (exc.strerror or str(exc)).lower()


def _writable(folder: Path) -> bool:
    """Whether this process may create files in `folder` (checked with its effective ids, as the write will be)."""
    effective = os.access in os.supports_effective_ids
    return os.access(folder, os.W_OK | os.X_OK, effective_ids=effective)


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _is_own(name: str) -> bool:
    """Whether a directory entry is vlmopt's bookkeeping (lock, journal, temporary or backup files)."""
    return name in (LOCK_NAME, JOURNAL_NAME) or name.startswith((_TMP_PREFIX, _OLD_PREFIX))


def fsync_path(path: Path) -> None:
    """Flush a file or a directory (its entries) to disk: what makes a rename that follows survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_tmp(folder: Path, data: bytes, suffix: str = "", sync: bool = True) -> Path:
    """A new `.tmp-*` file in `folder` holding `data`, created with the umask's modes (not mkstemp's 0600)."""
    while True:
        path = folder / f"{_TMP_PREFIX}{secrets.token_hex(6)}{suffix}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if sync:
                os.fsync(fh.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _normalized(options: dict[str, Any]) -> dict[str, Any]:
    """Options as they round-trip through JSON, so a stored and a fresh set compare equal."""
    return json.loads(json.dumps(options, sort_keys=True, default=str))


def printable_path(path: str | os.PathLike[str]) -> str:
    """A path as text even when its bytes are not UTF-8 (shown as \\xNN)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def require_utf8_path(path: str | os.PathLike[str]) -> None:
    """Refuse a path whose bytes are not UTF-8: ONNX Runtime and safetensors cannot open files under it."""
    try:
        os.fspath(Path(path).absolute()).encode("utf-8")
    except UnicodeEncodeError:
        raise VlmoptError(f"{printable_path(path)} is not a valid UTF-8 path, and ONNX Runtime and safetensors cannot open files under it; rename it") from None


class ModelDir:
    """A model directory: artifacts in sub-folders, described by `vlmopt.json`."""

    def __init__(self, path: str | os.PathLike[str]):
        require_utf8_path(path)
        self.path = Path(path)
        #: this process made the folder (an export into a new folder): it removes it again if nothing gets committed
        self._made_here = False
        self._may_make = False
        self._digests: dict[tuple[str, int, int, int], str] = {}

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
        """A model directory at `path`, made if needed; a non-empty folder that is not one is refused.

        A folder holding only what an interrupted vlmopt left there (its lock, temporary files) counts
        as empty. A folder made here is removed again when the lock is released with nothing committed.
        """
        model_dir = cls(path)
        if model_dir.path.exists() and not model_dir.path.is_dir():
            raise VlmoptError(f"{model_dir.path} exists and is not a directory")
        if model_dir.path.is_dir():
            if not model_dir.manifest_path.exists():
                journal = model_dir._read_journal()
                interrupted = journal["artifact"] if journal else None  # a first commit, cut short: settled under the lock
                if any(not _is_own(p.name) and p.name != interrupted for p in model_dir.path.iterdir()):
                    raise VlmoptError(f"{model_dir.path} is a non-empty directory that is not a vlmopt model directory; choose an empty or new folder")
        else:
            model_dir._may_make = True
            model_dir._make()
        return model_dir

    def _make(self) -> None:
        try:
            self.path.mkdir(parents=True)
            self._made_here = True
        except FileExistsError:
            pass

    # -- manifest ------------------------------------------------------------------------
    def load(self) -> dict[str, Artifact]:
        """The recorded artifacts; a manifest that is unreadable, of another schema or malformed raises."""
        if not self.manifest_path.exists():
            return {}
        try:
            data = json.loads(self.manifest_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise VlmoptError(f"manifest {self.manifest_path} cannot be read ({exc}); restore it or start a new model directory") from exc
        version = data.get("schema_version") if isinstance(data, dict) else None
        if version != SCHEMA_VERSION:
            raise VlmoptError(
                f"manifest {self.manifest_path} has schema version {version!r}; this vlmopt reads version {SCHEMA_VERSION}: "
                f"re-create the model directory with `vlmopt export SOURCE -o {self.path}` in a new folder"
            )
        problem = manifest_problem(data)
        if problem is None:
            try:
                return {name: Artifact.from_json(entry) for name, entry in data["artifacts"].items()}
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
        raise VlmoptError(f"manifest {self.manifest_path} is malformed: {problem}; restore it from a copy or start a new model directory")

    def recommendation(self) -> Recommendation | None:
        """What the last `bench` chose per tower and batch (the fastest artifact that passed its gate); None before any."""
        data = self._manifest_data().get("recommendation")
        return Recommendation.from_json(data) if data else None

    def record_recommendation(self, recommendation: Recommendation) -> None:
        write_atomically(self.manifest_path, self._manifest_bytes(self.load(), recommendation=recommendation.to_json()))

    def packages(self) -> dict[str, dict[str, Any]]:
        """The deployment repositories written from this directory (`vlmopt package`), by their absolute path."""
        return dict(self._manifest_data().get("packages") or {})

    def record_package(self, path: str, entry: dict[str, Any]) -> None:
        """Record (or replace) the repository written at `path`; artifacts and recommendation stay as they are."""
        packages = {**self.packages(), path: entry}
        write_atomically(self.manifest_path, self._manifest_bytes(self.load(), packages=packages))

    def _manifest_data(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            return {}
        self.load()  # the checks on schema and form
        return json.loads(self.manifest_path.read_bytes())

    def _manifest_bytes(self, artifacts: dict[str, Artifact], recommendation: dict[str, Any] | None = None, packages: dict[str, Any] | None = None) -> bytes:
        """The manifest's bytes; the recorded recommendation and packages are kept unless new ones are given."""
        from vlmopt import __version__

        data = {
            "schema_version": SCHEMA_VERSION,
            "vlmopt_version": __version__,
            "artifacts": {name: artifacts[name].to_json() for name in sorted(artifacts)},
        }
        kept = recommendation if recommendation is not None else self._manifest_data().get("recommendation")
        if kept is not None:
            data["recommendation"] = kept
        packaged = packages if packages is not None else self._manifest_data().get("packages")
        if packaged:
            data["packages"] = packaged
        return (json.dumps(data, indent=2, sort_keys=False) + "\n").encode()

    def _write_manifest(self, artifacts: dict[str, Artifact]) -> None:
        write_atomically(self.manifest_path, self._manifest_bytes(artifacts))

    def artifacts(self) -> dict[str, Artifact]:
        return self.load()

    def artifact(self, name: str, verify: bool = True) -> Artifact:
        """The recorded artifact `name`; with `verify` (the default: a stage is about to use it) its files
        must be as recorded, checked by size and mtime and hashed where those changed."""
        artifacts = self.load()
        if name not in artifacts:
            known = ", ".join(sorted(artifacts)) or "none"
            raise VlmoptError(f"no artifact named '{name}' in {self.path} (artifacts here: {known})")
        return self.require_intact(artifacts[name]) if verify else artifacts[name]

    def artifact_path(self, name: str) -> Path:
        return self.path / name

    def checkpoint_folder(self, artifact: Artifact) -> Path:
        """The folder of the Hugging Face artifact `artifact` descends from (itself if it is one): its config and processor."""
        artifacts = self.load()
        current = artifact
        while current.kind != "hf" and current.parent in artifacts:
            current = artifacts[current.parent]
        return self.artifact_path(current.name)

    def update_artifact(self, name: str, **fields: Any) -> Artifact:
        """Change recorded fields (benchmark results, say) of an existing artifact."""
        artifacts = self.load()
        artifact = artifacts[name]
        for key, value in fields.items():
            setattr(artifact, key, value)
        self._write_manifest(artifacts)
        return artifact

    # -- integrity -----------------------------------------------------------------------
    def check_files(self, artifact: Artifact, hashes: bool = False) -> list[str]:
        """How an artifact's folder differs from its record: missing, resized, changed or unrecorded files.

        A file whose size and mtime are the recorded ones is taken as unchanged unless `hashes`;
        any other file is hashed, so a same-size change is always found.
        """
        folder = self.artifact_path(artifact.name)
        if not folder.is_dir():
            return [f"its folder {folder} is missing"]
        found = []
        for record in artifact.files:
            path = folder / record.path
            try:
                info = path.stat()
            except (FileNotFoundError, NotADirectoryError):
                found.append(f"{record.path} is missing")
                continue
            if not stat.S_ISREG(info.st_mode):
                found.append(f"{record.path} is missing")
            elif info.st_size != record.size:
                found.append(f"{record.path} changed size")
            elif (hashes or info.st_mtime_ns != record.mtime_ns) and self._sha256(path, info) != record.sha256:
                found.append(f"{record.path} changed content")
        recorded = {r.path for r in artifact.files}
        for root, _, names in os.walk(folder):
            for name in names:
                rel = (Path(root) / name).relative_to(folder).as_posix()
                if rel not in recorded:
                    found.append(f"{rel} is not in the manifest")
        return found

    def require_intact(self, artifact: Artifact) -> Artifact:
        """`artifact`, if its files are as recorded; otherwise raise saying what changed and how to restore or re-make it."""
        found = self.check_files(artifact)
        if not found:
            return artifact
        shown = "; ".join(found[:3]) + (f"; and {len(found) - 3} more" if len(found) > 3 else "")
        raise VlmoptError(
            f"artifact '{artifact.name}' in {self.path} is not as recorded ({shown}); restore its files, or re-make it: {self.remake_hint(artifact)}"
        )

    def remake_hint(self, artifact: Artifact) -> str:
        if artifact.stage == "export":
            source = str(artifact.options.get("source") or "SOURCE")
            return f"`vlmopt export {shlex.quote(source)} -o {shlex.quote(str(self.path))} --force`"
        parts = ["vlmopt", artifact.stage, str(self.path), *(["--from", artifact.parent] if artifact.parent else []), "--name", artifact.name]
        return f"`{shlex.join(parts)} --force` with the options it was made with (`vlmopt info {shlex.quote(str(self.path))} --json` lists them)"

    def _sha256(self, path: Path, info: os.stat_result) -> str:
        key = (str(path), info.st_size, info.st_mtime_ns, info.st_ino)
        if key not in self._digests:
            self._digests[key] = sha256_file(path)
        return self._digests[key]

    # -- locking and recovery ------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the directory's write lock; a second vlmopt process gets a clear refusal.

        Taking it first settles what an interrupted command left (`recover`). The lock file exists
        only while the lock is held, and holds nothing, so a command that writes nothing leaves the
        directory exactly as it was.
        """
        fd = self._acquire()
        try:
            self.recover()
            yield
        finally:
            self._release(fd)

    def _acquire(self) -> int:
        if self.path.is_dir() and not _writable(self.path):
            reason = "read-only file system" if _read_only_fs(self.path) else "permission denied"
            raise VlmoptError(f"cannot write to {self.path} ({reason}); vlmopt needs write access to the model directory")
        lock_path = self.path / LOCK_NAME
        while True:
            try:
                fd = os.open(lock_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except FileNotFoundError:
                if not self._may_make:
                    raise VlmoptError(f"model directory {self.path} disappeared; run again") from None
                self._make()
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                holder = _lock_holder(lock_path)
                who = f" (pid {holder})" if holder else ""
                raise VlmoptError(f"{self.path} is in use by another vlmopt process{who}; wait for it to finish and run again") from None
            try:
                current = os.stat(lock_path)
                held = os.fstat(fd)
                if (current.st_ino, current.st_dev) == (held.st_ino, held.st_dev):
                    return fd
            except FileNotFoundError:
                pass
            # the previous holder removed the file while we waited for it: lock the current one
            os.close(fd)

    def _release(self, fd: int) -> None:
        try:
            nothing_committed = not self.manifest_path.exists()
            if nothing_committed:
                self._sweep_leftovers()
            with contextlib.suppress(OSError):
                os.unlink(self.path / LOCK_NAME)
            if nothing_committed and self._made_here:
                with contextlib.suppress(OSError):
                    os.rmdir(self.path)
        finally:
            os.close(fd)

    def _leftovers(self) -> set[str]:
        """What killed or interrupted commands left here: journal, temporary files or folders, a lock file."""
        try:
            return {p.name for p in self.path.iterdir() if _is_own(p.name)}
        except OSError:
            return set()

    def try_recover(self) -> str | None:
        """Settle what an interrupted command left, if the lock is free and the directory writable.

        For readers (`info`): returns None when there was nothing to settle or it is settled, else a
        line saying why it could not be. A lone stale lock file is removed when possible, never
        worth a warning.
        """
        leftovers = self._leftovers()
        if not leftovers:
            return None
        try:
            with self.lock():
                pass
        except VlmoptError as exc:
            return None if leftovers == {LOCK_NAME} else exc.message
        return None

    def recover(self) -> None:
        """Finish or undo the commit a killed or interrupted process left, and remove temporary files.

        Only called under the lock.
        """
        journal = self._read_journal()
        if journal is not None:
            self._settle(journal)
        self._sweep_leftovers()

    def _read_journal(self) -> dict[str, Any] | None:
        path = self.path / JOURNAL_NAME
        try:
            journal = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise VlmoptError(
                f"the journal of an interrupted commit, {path}, cannot be read ({exc}); compare the folders it names by hand, then remove it"
            ) from exc
        valid = (
            isinstance(journal, dict)
            and isinstance(journal.get("artifact"), str)
            and _ARTIFACT_NAME.match(journal["artifact"])
            and _is_own_name(journal.get("staging"), _TMP_PREFIX)
            and (journal.get("backup") is None or _is_own_name(journal.get("backup"), _OLD_PREFIX))
            and _is_own_name(journal.get("manifest"), _TMP_PREFIX)
            and isinstance(journal.get("manifest_sha256"), str)
        )
        if not valid:
            raise VlmoptError(f"the journal of an interrupted commit, {path}, is malformed; compare the folders it names by hand, then remove it")
        return journal

    def _settle(self, journal: dict[str, Any]) -> bool:
        """Roll an interrupted commit forward (its manifest is in place) or back (it is not); return whether it was committed."""
        committed = self.manifest_path.is_file() and sha256_file(self.manifest_path) == journal["manifest_sha256"]
        final = self.artifact_path(journal["artifact"])
        backup = self.path / journal["backup"] if journal["backup"] else None
        if committed:
            if backup is not None and os.path.lexists(backup):
                shutil.rmtree(backup)
        elif backup is not None:
            # without the backup, NAME still is (or again is) the recorded folder
            if os.path.lexists(backup):
                if os.path.lexists(final):
                    shutil.rmtree(final)
                os.replace(backup, final)
        elif os.path.lexists(final):
            shutil.rmtree(final)
        for leftover in (journal["staging"], journal["manifest"]):
            if os.path.lexists(self.path / leftover):
                _remove(self.path / leftover)
        fsync_path(self.path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path / JOURNAL_NAME)
        return committed

    def _sweep_leftovers(self) -> None:
        """Remove temporary files no journal names (only called under the lock, after the journal is settled)."""
        artifacts: dict[str, Artifact] | None = None
        for entry in list(self.path.iterdir()):
            if entry.name.startswith(_OLD_PREFIX):
                # Backups of vlmopt before the journal: one may hold the only copy of a recorded artifact.
                owner = entry.name[len(_OLD_PREFIX) :].rsplit("-", 1)[0]
                artifacts = self.load() if artifacts is None else artifacts
                if owner in artifacts and not os.path.lexists(self.artifact_path(owner)) and entry.is_dir():
                    os.replace(entry, self.artifact_path(owner))
                else:
                    _remove(entry)
            elif entry.name.startswith(_TMP_PREFIX):
                _remove(entry)
        reports = self.path / RESERVED_NAMES[0]
        if reports.is_dir():
            for entry in list(reports.iterdir()):
                if entry.name.startswith(_TMP_PREFIX):
                    _remove(entry)

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
        problems = self.check_files(existing)  # size and mtime, hashed where those changed: a same-size edit is seen
        if problems:
            return "files changed: " + "; ".join(problems)
        return None

    def up_to_date(self, name: str, stage: str, options: dict[str, Any], parent: Artifact | None, environment: dict[str, str] | None = None) -> Artifact | None:
        """The recorded artifact if it was made by this stage, options, parent and tool versions, with its files intact."""
        if self.staleness(name, stage, options, parent, environment) is not None:
            return None
        return self.load()[name]

    def check_artifact_name(self, name: str, stage: str) -> None:
        """Refuse names that are not plain folder names, are too long, are reserved, or belong to another stage's artifact."""
        if len(name) > MAX_NAME_LENGTH:
            raise VlmoptError(f"artifact name '{name[:20]}…' is {len(name)} characters long; the limit is {MAX_NAME_LENGTH}")
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
        """Make artifact `name` with `build(staging_folder)`, crash-safely; skip when already up to date.

        `build` writes the artifact's files into the folder it is given and raises on failure
        (a `CheckFailed` when verification fails). Only when it returns is the folder committed
        (see the module's docstring); the caller must hold `lock()`. The parent must be as recorded.
        """
        self.check_artifact_name(name, stage)
        if parent is not None:
            self.require_intact(parent)
        if not force:
            existing = self.up_to_date(name, stage, options, parent, environment)
            if existing is not None:
                return Produced(existing, skipped=True)

        staging = self.path / f"{_TMP_PREFIX}{name}-{secrets.token_hex(4)}"
        try:
            os.mkdir(staging, 0o777)
            try:
                output = build(staging)
            except Exception as exc:
                # a library's failed write into the staging folder (a full disk, say) names no file, or is no OSError at all
                code = exc.errno if isinstance(exc, OSError) else next((c for c, text in _SPACE_ERRORS.items() if text in str(exc)), None)
                if code in _SPACE_ERRORS and not (isinstance(exc, OSError) and exc.filename):
                    raise OSError(code, os.strerror(code), str(self.path)) from exc
                raise
            files = _seal(staging)
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
            self._commit(staging, artifact)
        except KeyboardInterrupt as exc:
            if isinstance(exc, Interrupted):
                raise
            raise Interrupted(f"nothing was committed; {self.path} is as it was") from exc
        finally:
            if os.path.lexists(staging):
                shutil.rmtree(staging, ignore_errors=True)
        return Produced(artifact, skipped=False)

    def _commit(self, staging: Path, artifact: Artifact) -> None:
        """Steps 2-6 of the protocol in the module's docstring; on any failure, settle before raising."""
        artifacts = self.load()
        artifacts[artifact.name] = artifact
        final = self.artifact_path(artifact.name)
        payload = self._manifest_bytes(artifacts)
        staged_manifest = _write_tmp(self.path, payload, suffix=".json")
        journal = {
            "artifact": artifact.name,
            "staging": staging.name,
            "backup": f"{_OLD_PREFIX}{artifact.name}-{secrets.token_hex(4)}" if os.path.lexists(final) else None,
            "manifest": staged_manifest.name,
            "manifest_sha256": hashlib.sha256(payload).hexdigest(),
        }
        try:
            write_atomically(self.path / JOURNAL_NAME, json.dumps(journal).encode())
            if journal["backup"]:
                os.replace(final, self.path / journal["backup"])
            os.replace(staging, final)
            fsync_path(self.path)
            os.replace(staged_manifest, self.manifest_path)
            fsync_path(self.path)
        except BaseException as exc:
            try:
                committed: bool | None = self._settle(journal)
            except BaseException:
                committed = None  # the journal stays: the next command on this directory settles it
            if isinstance(exc, KeyboardInterrupt):
                if committed is None:
                    message = f"{artifact.name} may be half committed; the next vlmopt command on {self.path} finishes or undoes it"
                elif committed:
                    message = f"{artifact.name} was committed before the interrupt"
                else:
                    message = f"nothing was committed; {self.path} is as it was"
                raise Interrupted(message) from exc
            raise
        try:
            self._settle(journal)
        except KeyboardInterrupt as exc:
            with contextlib.suppress(Exception):
                self._settle(journal)  # finish the clean-up the interrupt cut short
            raise Interrupted(f"{artifact.name} was committed before the interrupt") from exc


def _is_own_name(value: Any, prefix: str) -> bool:
    return isinstance(value, str) and value.startswith(prefix) and "/" not in value and value not in (".", "..")


def _seal(folder: Path) -> list[FileRecord]:
    """Give a staged folder the modes the umask allows (libraries write some files 0600), record its
    files, and fsync files, then folders, so no manifest ever names data that is not on disk."""
    mask = _umask()
    folders = []
    for root, _, names in os.walk(folder):
        folders.append(Path(root))
        os.chmod(root, 0o777 & ~mask)
        for name in names:
            path = Path(root) / name
            if not path.is_symlink():
                executable = path.stat().st_mode & 0o111
                os.chmod(path, (0o777 if executable else 0o666) & ~mask)
    records = file_records(folder)
    for record in records:
        fsync_path(folder / record.path)
    for path in reversed(folders):
        fsync_path(path)
    return records


def _lock_holder(lock_path: Path) -> int | None:
    """The pid holding a flock on `lock_path`, from /proc/locks (Linux); None where that is not known."""
    try:
        inode = os.stat(lock_path).st_ino
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
                return int(fields[4])
    except (OSError, ValueError):
        pass
    return None


# -- manifest structure ------------------------------------------------------------------------
_NUMBER = (int, float)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, _NUMBER) else type(value).__name__
    )


def _expect(value: Any, types: tuple[type, ...], where: str, what: str) -> str | None:
    if isinstance(value, bool) and bool not in types:
        return f"{where} must be {what}, got {_kind(value)}"
    return None if isinstance(value, types) else f"{where} must be {what}, got {_kind(value)}"


def manifest_problem(data: dict[str, Any]) -> str | None:
    """The first structural fault of a parsed manifest (a field of the wrong type or missing), or None."""
    artifacts = data.get("artifacts")
    if not isinstance(artifacts, dict):
        return f"'artifacts' must be an object, got {_kind(artifacts)}"
    if not isinstance(data.get("recommendation", {}), dict):
        return f"'recommendation' must be an object, got {_kind(data['recommendation'])}"
    if not isinstance(data.get("packages", {}), dict):
        return f"'packages' must be an object, got {_kind(data['packages'])}"
    for key, entry in artifacts.items():
        problem = _artifact_problem(key, entry)
        if problem:
            return problem
    return None


def _artifact_problem(key: str, entry: Any) -> str | None:
    at = f"artifacts.{key}"
    if not isinstance(entry, dict):
        return f"{at} must be an object, got {_kind(entry)}"
    checks: list[tuple[str, tuple[type, ...], str, bool]] = [
        ("name", (str,), "a string", True),
        ("kind", (str,), "a string", True),
        ("stage", (str,), "a string", True),
        ("options", (dict,), "an object", True),
        ("digest", (str,), "a string", True),
        ("files", (list,), "a list", True),
        ("parent", (str, type(None)), "a string or null", False),
        ("parent_digest", (str, type(None)), "a string or null", False),
        ("towers", (dict,), "an object", False),
        ("traits", (dict,), "an object", False),
        ("record", (dict,), "an object", False),
        ("environment", (dict,), "an object", False),
        ("tools", (dict,), "an object", False),
        ("created", (str,), "a string", False),
        ("verification", (dict, type(None)), "an object or null", False),
        ("benchmark", (dict, type(None)), "an object or null", False),
    ]
    for name, types, what, required in checks:
        if name not in entry:
            if required:
                return f"{at}.{name} is missing"
            continue
        problem = _expect(entry[name], types, f"{at}.{name}", what)
        if problem:
            return problem
    if entry["name"] != key:
        return f"{at}.name is '{entry['name']}', not '{key}'"
    if len(key) > MAX_NAME_LENGTH or not _ARTIFACT_NAME.match(key):
        return f"'{key}' is not a valid artifact name"
    for index, record in enumerate(entry["files"]):
        problem = _file_problem(f"{at}.files[{index}]", record)
        if problem:
            return problem
    for tower, value in (entry.get("towers") or {}).items():
        problem = _expect(value, (dict,), f"{at}.towers.{tower}", "an object") or (
            _expect(value.get("file"), (str, type(None)), f"{at}.towers.{tower}.file", "a string or null")
            or _expect(value.get("size"), (int, type(None)), f"{at}.towers.{tower}.size", "an integer or null")
        )
        if problem:
            return problem
    return _verification_problem(f"{at}.verification", entry.get("verification")) or _benchmark_problem(f"{at}.benchmark", entry.get("benchmark"))


def _file_problem(at: str, record: Any) -> str | None:
    if not isinstance(record, dict):
        return f"{at} must be an object, got {_kind(record)}"
    for name, types, what in (("path", (str,), "a string"), ("sha256", (str,), "a string"), ("size", (int,), "an integer")):
        if name not in record:
            return f"{at}.{name} is missing"
        problem = _expect(record[name], types, f"{at}.{name}", what)
        if problem:
            return problem
    if "mtime_ns" in record:
        problem = _expect(record["mtime_ns"], (int, type(None)), f"{at}.mtime_ns", "an integer or null")
        if problem:
            return problem
    path = record["path"]
    if not path or path.startswith("/") or "\\" in path or any(part in ("", ".", "..") for part in path.split("/")):
        return f"{at}.path '{path}' is not a plain relative path"
    if not _SHA256.match(record["sha256"]):
        return f"{at}.sha256 is not a sha256 hex digest"
    if record["size"] < 0:
        return f"{at}.size is negative"
    return None


def _verification_problem(at: str, verification: dict[str, Any] | None) -> str | None:
    """The fields `info` and later stages read: per tower and kind of data, each output's figures."""
    if verification is None:
        return None
    for name, types, what in (("reference", (str,), "a string"), ("towers", (dict,), "an object")):
        if name not in verification:
            return f"{at}.{name} is missing"
        problem = _expect(verification[name], types, f"{at}.{name}", what)
        if problem:
            return problem
    if "passed" in verification and not isinstance(verification["passed"], bool):
        return f"{at}.passed must be a boolean, got {_kind(verification['passed'])}"
    for name, types, what in (("gates", (dict,), "an object"), ("metrics", (list,), "a list"), ("failures", (list,), "a list")):
        if name in verification:
            problem = _expect(verification[name], types, f"{at}.{name}", what)
            if problem:
                return problem
    for tower, checks in verification["towers"].items():
        if not isinstance(checks, list):
            return f"{at}.towers.{tower} must be a list, got {_kind(checks)}"
        for index, check in enumerate(checks):
            where = f"{at}.towers.{tower}[{index}]"
            if not isinstance(check, dict):
                return f"{where} must be an object, got {_kind(check)}"
            if "outputs" not in check:
                return f"{where}.outputs is missing"
            if not isinstance(check["outputs"], dict):
                return f"{where}.outputs must be an object, got {_kind(check['outputs'])}"
            for output, numbers in check["outputs"].items():
                if not isinstance(numbers, dict):
                    return f"{where}.outputs.{output} must be an object, got {_kind(numbers)}"
                for name in ("max_abs_diff", "cosine_min", "cosine_mean"):
                    problem = _expect(numbers.get(name), _NUMBER, f"{where}.outputs.{output}.{name}", "a number")
                    if problem:
                        return problem
    for index, metric in enumerate(verification.get("metrics", [])):
        if not isinstance(metric, dict):
            return f"{at}.metrics[{index}] must be an object, got {_kind(metric)}"
        problem = _expect(metric.get("value"), _NUMBER, f"{at}.metrics[{index}].value", "a number")
        if problem:
            return problem
    return None


def _benchmark_problem(at: str, benchmark: dict[str, Any] | None) -> str | None:
    if benchmark is None:
        return None
    rows = benchmark.get("rows", [])
    if not isinstance(rows, list):
        return f"{at}.rows must be a list, got {_kind(rows)}"
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            return f"{at}.rows[{index}] must be an object, got {_kind(row)}"
        if row.get("speedup") is not None:
            problem = _expect(row["speedup"], _NUMBER, f"{at}.rows[{index}].speedup", "a number or null")
            if problem:
                return problem
    return None
