"""The stage contract: one way to define a stage, and the common path every stage takes.

A stage is a `Stage` subclass in one module of `vlmopt.stages`. It declares its name, the kind of
artifact it makes, which parents it accepts (`Accepts`), the tools whose versions its output depends
on, and its options (a dataclass of `vlmopt.options.option` fields). It implements only its own
step: `make_tower` (one graph per tower of the parent), or `build` for stages that are not per tower,
plus, where needed, `prepare` (checks and loading before any work) and `verify`. A stage whose options
declare `--eval-images`/`--eval-text` (`vlmopt.options`) is verified on the real evaluation data
(`vlmopt.evaluation`), loaded before any work into `job.state["data"]`.

`Stage.run` is the common path, written once:
    validate options -> what this machine lacks -> resolve and check the parent -> prepare ->
    evaluation data -> up to date? -> build in a temporary folder (per tower) -> verify -> commit (`ModelDir.produce`).

The CLI command, the recipe step and the Python function of a stage are all made from this one class
(see `vlmopt.cli` and `vlmopt.api`).
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from vlmopt import options as opts
from vlmopt.errors import VlmoptError
from vlmopt.families import Tower
from vlmopt.records import TowerRecord, Traits, Verification
from vlmopt.versions import tool_versions
from vlmopt.workspace import Artifact, ModelDir, StageOutput


def _ignore(message: str) -> None:
    return None


def physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


@dataclass
class RunContext:
    """How a stage runs, as opposed to what it makes: nothing here is recorded or keys the up-to-date check.

    `threads` is the one thread rule of every stage: a whole number of at least 1, or None for this
    machine's physical cores."""

    force: bool = False
    threads: int | None = None
    debug: bool = False
    progress: Callable[[str], None] = _ignore
    warn: Callable[[str], None] = _ignore

    def __post_init__(self) -> None:
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1):
            raise VlmoptError(f"--threads must be a whole number of at least 1, got {self.threads}")

    @property
    def thread_count(self) -> int:
        return self.threads or physical_cores()


KIND_NAMES = {"hf": "a Hugging Face", "onnx": "an ONNX", "tensorrt": "a TensorRT", "openvino": "an OpenVINO"}


@dataclass(frozen=True)
class Accepts:
    """Which artifacts a stage reads: their kinds and precisions, and whether ONNX Runtime-fused graphs or
    graphs with ONNX Runtime-only operators may be its input. `hint` says what to read instead;
    `ort_only_ops_refusal` why such operators cannot be taken."""

    kinds: tuple[str, ...]
    precisions: tuple[str, ...] | None = None
    fused: bool = True
    ort_only_ops: bool = True
    hint: str = ""
    ort_only_ops_refusal: str = ""

    def check(self, stage: str, parent: Artifact) -> None:
        hint = f"; {self.hint}" if self.hint else ""
        if parent.kind not in self.kinds:
            wanted = " or ".join(KIND_NAMES.get(k, k) for k in self.kinds)
            raise VlmoptError(f"{stage} reads {wanted} artifact; '{parent.name}' is {KIND_NAMES.get(parent.kind, parent.kind)} artifact{hint}")
        if self.precisions is not None and parent.traits.precision not in self.precisions:
            raise VlmoptError(f"'{parent.name}' is already {parent.traits.precision}; {stage} reads {'/'.join(self.precisions)} artifacts{hint}")
        if not self.fused and parent.traits.fused:
            raise VlmoptError(f"'{parent.name}' is already optimized (fused by ONNX Runtime's optimizer){hint}")
        if not self.ort_only_ops and parent.traits.ort_only_ops:
            why = self.ort_only_ops_refusal or f"{stage} cannot take"
            raise VlmoptError(f"'{parent.name}' holds ONNX Runtime-only operators ({', '.join(parent.traits.ort_only_ops)}) that {why}{hint}")


@dataclass
class StageResult:
    """What every stage returns, bench included: the artifact (or report) it made, or why it did not need to."""

    stage: str
    name: str
    skipped: bool
    artifact: Artifact | None = None
    reason: str | None = None
    report: dict[str, Any] | None = None
    files: list[str] = field(default_factory=list)
    #: the artifact's folder
    path: str | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"stage": self.stage, "name": self.name, "skipped": self.skipped, "reason": self.reason, "path": self.path}
        if self.artifact is not None:
            data["artifact"] = self.artifact.to_json()
        if self.report is not None:
            data["report"] = self.report
        if self.files:
            data["files"] = self.files
        return data


@dataclass
class Job:
    """One run of a stage: its directory, options, parent and context, and what `prepare` found for `build`."""

    stage: Stage
    model_dir: ModelDir
    options: Any
    parent: Artifact | None
    context: RunContext
    state: dict[str, Any] = field(default_factory=dict)
    #: what the stage records beside its declared options (e.g. the towers it chose); keys the up-to-date check too
    recorded: dict[str, Any] = field(default_factory=dict)

    @property
    def parent_dir(self) -> Path:
        assert self.parent is not None
        return self.model_dir.artifact_path(self.parent.name)

    @property
    def towers(self) -> dict[str, Tower]:
        """The parent's towers (interfaces only; no PyTorch wrapper)."""
        assert self.parent is not None
        return {name: record.tower for name, record in self.parent.towers.items()}

    def parent_file(self, tower: str) -> Path:
        assert self.parent is not None
        return self.parent_dir / (self.parent.towers[tower].file or "")

    def say(self, message: str) -> None:
        self.context.progress(message)

    def warn(self, message: str) -> None:
        self.context.warn(message)


@dataclass
class Made:
    """What `make_tower` made of one tower: its record, and what the stage did to it (its own record)."""

    tower: TowerRecord
    work: dict[str, Any] = field(default_factory=dict)


class Stage:
    """A stage: declarations as class attributes, its own step as methods. See the module docstring."""

    #: the command name (`vlmopt NAME`)
    name: ClassVar[str] = ""
    #: its options dataclass
    Options: ClassVar[type] = object
    #: the kind of artifact it makes (hf, onnx, tensorrt, openvino); "" for stages that make reports
    produces: ClassVar[str] = ""
    #: the parents it reads; None for a stage without a parent (export)
    accepts: ClassVar[Accepts | None] = None
    #: packages whose versions its output depends on: a different version makes its artifacts stale
    tools: ClassVar[tuple[str, ...]] = ()
    #: a stage that creates the model directory (export) rather than opening one
    creates_directory: ClassVar[bool] = False
    #: the first line of `--help`; `details` follows it (an example, what exit 1 means)
    summary: ClassVar[str] = ""
    details: ClassVar[str] = ""

    # -- what a stage may override -----------------------------------------------------------
    def requires(self, options: Any) -> str | None:
        """What this machine lacks for the stage (TensorRT, a GPU), in one line; None when it has it all."""
        return None

    def artifact_name(self, options: Any) -> str:
        return options.name

    def parent_name(self, options: Any) -> str | None:
        return getattr(options, "source", None)

    def environment(self, options: Any) -> dict[str, str]:
        """What besides options and parent its output depends on: the versions of `tools`."""
        versions = tool_versions()
        return {tool: versions.get(tool, "not installed") for tool in self.tools}

    def check_parent(self, parent: Artifact, options: Any) -> None:
        """Refuse a parent this stage cannot read (its declared `accepts`, then the stage's own rules)."""
        if self.accepts is not None:
            self.accepts.check(self.name, parent)

    def prepare(self, job: Job) -> None:
        """Checks and loading before any work (raise VlmoptError for what the parent or data cannot take)."""

    def verified_towers(self, job: Job) -> dict[str, Tower]:
        """The towers `verify` checks (after `prepare`): the parent's, by default."""
        return job.towers

    def evaluates(self, options: Any) -> bool:
        """Whether the stage verifies on evaluation data: it declares `--eval-images` and `--eval-text`."""
        return hasattr(options, "eval_images") and hasattr(options, "eval_text")

    def build(self, job: Job, tmp: Path) -> StageOutput:
        """Write the artifact into `tmp`: by default one graph per tower of the parent, then verify them all."""
        made = {}
        for name in job.towers:
            made[name] = self.make_tower(job, name, tmp)
        towers = {name: m.tower for name, m in made.items()}
        verification = self.verify(job, tmp, towers)
        return StageOutput(towers=towers, traits=self.traits(job, made), record=self.record(job, made), verification=verification)

    def make_tower(self, job: Job, tower: str, tmp: Path) -> Made:
        raise NotImplementedError(f"{type(self).__name__} implements neither build nor make_tower")

    def verify(self, job: Job, tmp: Path, towers: dict[str, TowerRecord]) -> Verification | None:
        """Check the new towers against the parent's on the same inputs (the shared verification service)."""
        from vlmopt.verification import Gates, verify_artifacts

        assert job.parent is not None
        candidate = provisional(self, job, tmp, towers)
        job.say(f"verifying against '{job.parent.name}'")
        return verify_artifacts(
            job.model_dir.artifact_path(job.parent.name),
            job.parent,
            tmp,
            candidate,
            Gates.of(job.options),
            data=job.state.get("data"),
            threads=job.context.thread_count,
        )

    def traits(self, job: Job, made: dict[str, Made]) -> Traits:
        return job.parent.traits.derive() if job.parent else Traits()

    def record(self, job: Job, made: dict[str, Made]) -> dict[str, Any]:
        """What this stage did, for its report (no other stage reads it)."""
        return {"towers": {name: m.work for name, m in made.items() if m.work}}

    # -- the common path ---------------------------------------------------------------------
    def options(self, values: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        """Options from recipe keys or field names, every value checked against its declaration."""
        return opts.parse_options(self.Options, {**(values or {}), **kwargs})

    def open(self, directory: str | os.PathLike[str] | ModelDir) -> ModelDir:
        if isinstance(directory, ModelDir):
            return directory
        return ModelDir.create(directory) if self.creates_directory else ModelDir.open(directory)

    def run(self, directory: str | os.PathLike[str] | ModelDir, options: Any = None, context: RunContext | None = None) -> StageResult:
        """Run the stage on a model directory: skipped when up to date, else built, verified and committed atomically.

        Raises `VlmoptError` (bad input: exit 2) or `CheckFailed` (verification failed: exit 1); either way
        nothing is committed."""
        options = options if options is not None else self.options()
        opts.validate(options)
        context = context or RunContext()
        model_dir = self.open(directory)
        # the lock's release removes a folder `open` made, if nothing got committed into it
        with model_dir.lock():
            return self._run_locked(model_dir, options, context)

    def _job(self, model_dir: ModelDir, options: Any, context: RunContext) -> Job:
        """The parent resolved and checked, then `prepare`: everything a run decides on before it makes anything."""
        parent = None
        parent_name = self.parent_name(options) if self.accepts is not None else None
        if parent_name is not None:
            parent = model_dir.artifact(parent_name)
            self.check_parent(parent, options)
        job = Job(self, model_dir, options, parent, context)
        self.prepare(job)
        return job

    def staleness(self, directory: str | os.PathLike[str] | ModelDir, options: Any, context: RunContext | None = None) -> str | None:
        """Why `run` would make the artifact (again), or None when it is up to date; makes and writes nothing.

        The same decision `run` takes (`prepare` included), for `vlmopt run --dry-run`."""
        opts.validate(options)
        model_dir = directory if isinstance(directory, ModelDir) else ModelDir.open(directory)
        job = self._job(model_dir, options, context or RunContext())
        recorded = {**opts.recorded(options), **job.recorded}
        return model_dir.staleness(self.artifact_name(options), self.name, recorded, job.parent, self.environment(options))

    def reads(self, options: Any, artifacts: dict[str, str]) -> list[str]:
        """The artifacts a run reads, given those the directory will hold (name -> kind): its parent by default."""
        if self.accepts is None:
            return []
        parent = self.parent_name(options)
        return [parent] if parent else []

    def _run_locked(self, model_dir: ModelDir, options: Any, context: RunContext) -> StageResult:
        job = self._job(model_dir, options, context)
        if self.evaluates(options):
            from vlmopt.evaluation import load_evaluation

            job.state["data"] = load_evaluation(model_dir, self.verified_towers(job), options.eval_images, options.eval_text)
            for tower, data in job.state["data"].towers.items():
                if data.missing:
                    job.warn(f"the {tower} tower is verified on SYNTHETIC random inputs only: {data.missing}")
        missing = self.requires(options)
        if missing:
            raise VlmoptError(missing)
        name = self.artifact_name(options)
        parent = job.parent
        produced = model_dir.produce(
            name,
            kind=self.produces,
            stage=self.name,
            options={**opts.recorded(options), **job.recorded},
            parent=parent,
            environment=self.environment(options),
            build=lambda tmp: self.build(job, tmp),
            force=context.force,
        )
        reason = "up to date: inputs, options and tool versions unchanged" if produced.skipped else None
        return StageResult(self.name, name, produced.skipped, produced.artifact, reason=reason, path=str(model_dir.artifact_path(name)))

    def describe(self, artifact: Artifact) -> list[Any]:
        """What the CLI prints about a new artifact beyond its verification and sizes (rich renderables)."""
        return []

    def describe_report(self, report: dict[str, Any]) -> list[Any]:
        """What the CLI prints about a report (bench)."""
        return []

    def remake_args(self, options: Any) -> list[str]:
        """The flags that make the same artifact again: every non-default option, with `--from` and `--name` spelled out."""
        if "name" in getattr(options, "__dataclass_fields__", {}):
            options = dataclasses.replace(options, name=self.artifact_name(options))
        return opts.option_args(options)

    def command_line(self, directory: str | Path, options: Any) -> str:
        """The command that makes the same artifact again, ready to paste (with --force)."""
        return shlex.join(["vlmopt", self.name, str(directory), *self.remake_args(options), "--force"])


def provisional(stage: Stage, job: Job, folder: Path, towers: dict[str, TowerRecord]) -> Artifact:
    """The artifact being made, as runners see it before it is committed (no files recorded yet)."""
    return Artifact(
        name=stage.artifact_name(job.options),
        kind=stage.produces,
        stage=stage.name,
        options={},
        parent=job.parent.name if job.parent else None,
        parent_digest=None,
        digest="",
        files=[],
        towers=towers,
        traits=job.parent.traits if job.parent else Traits(),
    )
