"""Recipes: the whole pipeline in one reviewed YAML file, checked whole before any step runs.

    source: demo:clip-base          # a hub id, a local folder, or demo:FAMILY-SIZE
    model_dir: ../build/clip        # paths are relative to the recipe's folder
    steps:
      - convert: {}
      - quantize: {mode: int8-static, calib_images: data/calib}
      - bench: {batch: [1, 8]}
    gates: {max_size_mb: {int8-static: 120}}

`load_recipe` parses the file with PyYAML's safe loader (composing nodes first, so every error can
name `file:line`) and checks what a run needs before anything is made: the keys, the stages, each
step's options (through the stage's own declarations, `vlmopt.options.parse_options`), where each
step's input comes from, and the gates. Every problem is one `VlmoptError` line. Running a checked
recipe is `vlmopt.pipeline`.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlmopt import options as opts
from vlmopt.errors import VlmoptError
from vlmopt.stage import KIND_NAMES, Stage
from vlmopt.stages import STAGES
from vlmopt.workspace import MANIFEST_NAME, ModelDir

#: the keys a recipe may have at its top level
TOP_LEVEL = ("source", "revision", "trust_remote_code", "model_dir", "threads", "steps", "gates")
#: gate kinds: what each bounds, and its range
GATES = {
    "max_size_mb": "the artifact's size in MB (2**20 bytes) at most",
    "min_cosine": "the worst gated cosine of the artifact's verification at least",
    "min_speedup": "the smallest speed-up over PyTorch in the latest bench report at least",
}
DEMO_PREFIX = "demo:"
#: where demo checkpoints are built, beside the model directory
DEMO_CACHE = ".vlmopt-demo"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


@dataclass
class Step:
    """One step of a recipe: a stage with its checked options.

    `number` is its place under `steps:` (from 1; 0 for the export that `source` implies); `id` is the
    artifact it makes, or the stage's name for stages that make reports (bench)."""

    number: int
    stage: Stage
    options: Any
    line: int
    id: str
    reads: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.id if self.id == self.stage.name else f"{self.id} ({self.stage.name})"

    @property
    def makes_artifact(self) -> bool:
        return bool(self.stage.produces)


@dataclass
class Gate:
    """A bound on one artifact, checked after every step: `max_size_mb`, `min_cosine` or `min_speedup`."""

    kind: str
    artifact: str
    limit: float
    line: int


@dataclass
class DemoSource:
    """`source: demo:FAMILY-SIZE`: a demo checkpoint built (once) into `folder`, then exported like a local folder."""

    family: str
    size: str
    folder: Path

    @property
    def spec(self) -> str:
        return f"{DEMO_PREFIX}{self.family}-{self.size}"


@dataclass
class Recipe:
    """A checked recipe: paths resolved, every step's options parsed, every input accounted for."""

    path: Path
    model_dir: Path
    steps: list[Step]
    gates: list[Gate]
    threads: int | None = None
    demo: DemoSource | None = None
    source: str | None = None

    def step(self, selector: str) -> Step:
        """The step a selector names: the artifact it makes (`int8-static`, `bench`), its stage when only one step
        has it, or its number under `steps:` (from 1); the export that `source` implies is `hf` or `export`."""
        text = str(selector).strip()
        by_id = [s for s in self.steps if s.id == text]
        if by_id:
            return by_id[0]
        if text.isdigit():
            number = int(text)
            found = [s for s in self.steps if s.number == number and s.number > 0]
            if found:
                return found[0]
            raise VlmoptError(f"{self.path}: no step number {number}; the recipe has steps 1 to {max((s.number for s in self.steps), default=0)}")
        by_stage = [s for s in self.steps if s.stage.name == text]
        if len(by_stage) == 1:
            return by_stage[0]
        if len(by_stage) > 1:
            raise VlmoptError(f"{self.path}: '{text}' names {len(by_stage)} steps ({', '.join(s.id for s in by_stage)}); name one of those")
        raise VlmoptError(f"{self.path}: no step '{text}'{_suggest(text, [s.id for s in self.steps])} (steps: {', '.join(s.id for s in self.steps)})")


# -- parsing with places ----------------------------------------------------------------------------
class _Doc:
    """The composed YAML document and its file name: nodes keep their lines; values are built by the safe constructor."""

    def __init__(self, name: str, loader: yaml.SafeLoader):
        self.name = name
        self.loader = loader

    def where(self, node: yaml.Node) -> str:
        return f"{self.name}:{node.start_mark.line + 1}"

    def fail(self, node: yaml.Node, message: str) -> VlmoptError:
        return VlmoptError(f"{self.where(node)}: {message}")

    def value(self, node: yaml.Node) -> Any:
        try:
            return self.loader.construct_object(node, deep=True)
        except yaml.YAMLError as exc:  # a tag the safe constructor does not build (!!python/...)
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise self.fail(node, f"not valid YAML: {problem}") from None

    def mapping(self, node: yaml.Node, what: str) -> list[tuple[str, yaml.Node, yaml.Node]]:
        """(key, key node, value node) of a mapping node, refusing other nodes, keys that are not text, and repeated keys."""
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{what} must be a mapping (key: value), not {_kind(node)}")
        items, seen = [], set()
        for key_node, value_node in node.value:
            key = self.value(key_node) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str):
                raise self.fail(key_node, f"{what}: keys must be names, not {_kind(key_node)}")
            if key in seen:
                raise self.fail(key_node, f"{what}: '{key}' is given twice")
            seen.add(key)
            items.append((key, key_node, value_node))
        return items


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if node.tag == "tag:yaml.org,2002:null":
        return "empty"
    return f"'{node.value}'" if len(str(node.value)) < 40 else "text"


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def _check_tags(doc: _Doc, root: yaml.Node) -> None:
    """Refuse any tag the safe constructor does not build (`!!python/...`), wherever it is, even where only children are read.

    Each node is visited once: aliases share nodes, and a document of nested aliases must not cost exponential time."""
    seen: set[int] = set()
    pending = [root]
    while pending:
        node = pending.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.tag not in yaml.SafeLoader.yaml_constructors:
            raise doc.fail(node, f"not valid YAML: the tag {node.tag} is not allowed in a recipe")
        if isinstance(node, yaml.SequenceNode):
            pending += node.value
        elif isinstance(node, yaml.MappingNode):
            pending += [n for pair in node.value for n in pair]


def _compose(path: Path, name: str) -> tuple[yaml.Node, _Doc]:
    if not path.exists():
        raise VlmoptError(f"recipe {name} does not exist")
    if not path.is_file():
        raise VlmoptError(f"recipe {name} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise VlmoptError(f"recipe {name} cannot be read as UTF-8 text ({type(exc).__name__}); a recipe is a YAML file") from None
    try:
        loader = yaml.SafeLoader(text)
        node = loader.get_single_node()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        place = f"{name}:{mark.line + 1}" if mark is not None else name
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise VlmoptError(f"{place}: not valid YAML: {problem}") from None
    doc = _Doc(name, loader)
    if node is not None:
        _check_tags(doc, node)
    if node is None:
        raise VlmoptError(f"{name}: the recipe is empty; a recipe is a mapping with at least `steps:` (and `source:`, `model_dir:`)")
    if not isinstance(node, yaml.MappingNode):
        raise doc.fail(node, f"a recipe is a mapping with keys such as source, model_dir, steps and gates, not {_kind(node)}")
    return node, doc


# -- the checks -----------------------------------------------------------------------------------
def load_recipe(path: str | os.PathLike[str], model_dir: str | os.PathLike[str] | None = None) -> Recipe:
    """Parse and check a recipe; raises `VlmoptError` naming `file:line` for the first problem found.

    `model_dir` (relative to the current folder) replaces the recipe's own `model_dir`."""
    recipe_path = Path(path)
    name = str(path)
    root, doc = _compose(recipe_path, name)
    try:
        return _check(recipe_path, root, doc, model_dir)
    finally:
        doc.loader.dispose()


def _check(recipe_path: Path, root: yaml.Node, doc: _Doc, model_dir_override: str | os.PathLike[str] | None) -> Recipe:
    base = recipe_path.resolve().parent
    top = {key: (key_node, value_node) for key, key_node, value_node in doc.mapping(root, "the recipe")}
    for key, (key_node, _) in top.items():
        if key not in TOP_LEVEL:
            raise doc.fail(key_node, f"unknown key '{key}'{_suggest(key, list(TOP_LEVEL))} (keys: {', '.join(TOP_LEVEL)})")

    # model_dir: the recipe's (relative to its folder) unless the caller gives one
    if model_dir_override is not None:
        model_dir = Path(model_dir_override)
    elif "model_dir" in top:
        value = doc.value(top["model_dir"][1])
        if not isinstance(value, str) or not value.strip():
            raise doc.fail(top["model_dir"][1], "model_dir must be a folder path")
        model_dir = _relative(base, value)
    else:
        raise VlmoptError(f"{doc.name}: the recipe has no model_dir (the folder its artifacts go to, relative to the recipe)")
    held = _held(model_dir)

    threads = None
    if "threads" in top:
        value = doc.value(top["threads"][1])
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise doc.fail(top["threads"][1], f"threads must be a whole number of at least 1, got {value!r}")
        threads = value

    steps: list[Step] = []
    demo = None
    source_text = None
    if "source" in top:
        source_node = top["source"][1]
        export, demo, source_text = _source_step(doc, top, source_node, base, model_dir)
        steps.append(export)
    elif held is None:
        raise VlmoptError(
            f"{doc.name}: the recipe has no source, and {model_dir} holds no model directory to start from; add `source:` (a hub id, a folder, or demo:clip-base)"
        )
    else:
        for key in ("revision", "trust_remote_code"):
            if key in top:
                raise doc.fail(top[key][0], f"{key} applies to the source; the recipe has no source")

    if "steps" not in top:
        raise VlmoptError(f"{doc.name}: the recipe has no steps (a list such as `steps: [convert: {{}}, quantize: {{mode: int8-dynamic}}]`)")
    steps += _steps(doc, top["steps"][1], base, model_dir, held or {}, steps)
    gates = _gates(doc, top["gates"][1], steps) if "gates" in top else []
    return Recipe(recipe_path, model_dir, steps, gates, threads, demo, source_text)


def _relative(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return Path(os.path.normpath(path if path.is_absolute() else base / path))


def _held(model_dir: Path) -> dict[str, str] | None:
    """The artifacts (name -> kind) the model directory holds already; None when there is no model directory there."""
    if model_dir.exists() and not model_dir.is_dir():
        raise VlmoptError(f"model_dir {model_dir} exists and is not a directory")
    if not (model_dir / MANIFEST_NAME).is_file():
        if model_dir.is_dir():
            ModelDir.create(model_dir)  # refuses a folder of other files, as the export would; writes nothing to an existing folder
        return None
    return {name: artifact.kind for name, artifact in ModelDir(model_dir).load().items()}


def _source_step(doc: _Doc, top: dict[str, tuple[yaml.Node, yaml.Node]], node: yaml.Node, base: Path, model_dir: Path) -> tuple[Step, DemoSource | None, str]:
    from vlmopt.demo import DEMO_FAMILIES, SIZES
    from vlmopt.stages.export import STAGE as EXPORT

    value = doc.value(node)
    if not isinstance(value, str) or not value.strip():
        raise doc.fail(node, "source must be a hub id (org/name), a local model folder, or demo:FAMILY-SIZE (demo:clip-base)")
    value = value.strip()
    demo = None
    if value.startswith(DEMO_PREFIX):
        spec = value[len(DEMO_PREFIX) :]
        family, _, size = spec.rpartition("-")
        if size not in SIZES:
            family, size = spec, "base"
        if family not in DEMO_FAMILIES:
            raise doc.fail(
                node, f"source {value}: no demo family '{family}' (demo:FAMILY-SIZE with FAMILY one of {', '.join(DEMO_FAMILIES)}, SIZE tiny or base)"
            )
        demo = DemoSource(family, size, model_dir.parent / DEMO_CACHE / f"{family}-{size}")
        source = str(demo.folder)
    else:
        local = _relative(base, value)
        if local.exists():
            if not local.is_dir() or not (local / "config.json").is_file():
                raise doc.fail(node, f"source {value} ({local}) is not a Hugging Face model folder (no config.json in it)")
            source = str(local)
        elif value.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(value):
            raise doc.fail(node, f"source {value} does not exist ({local}; paths are relative to the recipe's folder) and is not a hub id like org/name")
        else:
            source = value
    values: dict[str, Any] = {"source": source}
    for key in ("revision", "trust_remote_code"):
        if key in top:
            values[key] = doc.value(top[key][1])
    options = opts.parse_options(EXPORT.Options, values, where=f"{doc.where(node)}: source: ")
    return Step(0, EXPORT, options, node.start_mark.line + 1, EXPORT.artifact_name(options)), demo, value


def _steps(doc: _Doc, node: yaml.Node, base: Path, model_dir: Path, held: dict[str, str], earlier: list[Step]) -> list[Step]:
    if not isinstance(node, yaml.SequenceNode):
        raise doc.fail(node, f"steps must be a list of one-key mappings such as `- quantize: {{mode: fp16}}`, not {_kind(node)}")
    if not node.value:
        raise doc.fail(node, "steps is empty; list at least one step")
    stages = {stage.name: stage for stage in STAGES}
    made: dict[str, tuple[str, Step]] = {s.id: (s.stage.produces, s) for s in earlier}
    steps: list[Step] = []
    for number, item in enumerate(node.value, start=1):
        if isinstance(item, yaml.ScalarNode) and isinstance(doc.value(item), str):
            stage_name, stage_node, values_node = doc.value(item), item, None
        elif isinstance(item, yaml.MappingNode) and len(item.value) == 1:
            (stage_name, stage_node, values_node) = doc.mapping(item, f"step {number}")[0]
        else:
            raise doc.fail(item, f"step {number} must be one stage with its options, such as `- quantize: {{mode: fp16}}`, not {_kind(item)}")
        if stage_name == "export":
            raise doc.fail(stage_node, "export is what `source:` does; give the checkpoint as the recipe's source")
        if stage_name not in stages:
            known = ", ".join(s for s in stages if s != "export")
            raise doc.fail(stage_node, f"unknown stage '{stage_name}'{_suggest(stage_name, list(stages))} (stages: {known})")
        stage = stages[stage_name]
        where = f"{doc.where(stage_node)}: {stage_name}: "
        values, lines = _options(doc, stage, stage_name, values_node, base)
        options = opts.parse_options(stage.Options, values, where=where)
        step = Step(number, stage, options, stage_node.start_mark.line + 1, stage.artifact_name(options) if stage.produces else stage.name)
        if step.id in made:
            other = made[step.id][1]
            what = f"step {other.number}" if other.number else "the source"
            hint = "; give one a different `name`" if "name" in opts.by_key(stage.Options) else "; a recipe measures once"
            raise doc.fail(stage_node, f"{stage_name} makes '{step.id}', which {what} already makes{hint}")
        if step.makes_artifact:
            try:
                ModelDir(model_dir).check_artifact_name(step.id, stage.name)
            except VlmoptError as exc:
                raise VlmoptError(f"{where}{exc.message}") from None
        available = {**held, **{name: kind for name, (kind, _) in made.items() if kind}}
        step.reads = stage.reads(options, available)
        _check_inputs(doc, step, lines, stage_node, made, held, model_dir)
        made[step.id] = (stage.produces, step)
        steps.append(step)
    return steps


def _options(doc: _Doc, stage: Stage, stage_name: str, node: yaml.Node | None, base: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """A step's option values (paths resolved against the recipe's folder), each checked where it is written."""
    if node is None or (isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"):
        return {}, {}
    declared = opts.by_key(stage.Options)
    values: dict[str, Any] = {}
    lines: dict[str, int] = {}
    for key, key_node, value_node in doc.mapping(node, f"the options of {stage_name}"):
        where = f"{doc.where(key_node)}: {stage_name}: "
        d = declared.get(key)
        if d is None:
            known = sorted({x.key for x in declared.values()})
            raise VlmoptError(f"{where}unknown option '{key}'{_suggest(key, known)} (options: {', '.join(known)})")
        value = doc.value(value_node)
        if d.spec.path and isinstance(value, str) and value.strip():
            resolved = _relative(base, value)
            if not resolved.exists():
                raise VlmoptError(f"{where}{key}: {value} does not exist ({resolved}; paths are relative to the recipe's folder)")
            value = str(resolved)
        try:
            opts.parse_value(d, value, f"'{key}'")
        except VlmoptError as exc:
            raise VlmoptError(f"{where}{exc.message}") from None
        values[key] = value
        lines[d.name] = key_node.start_mark.line + 1
    return values, lines


def _check_inputs(
    doc: _Doc, step: Step, lines: dict[str, int], stage_node: yaml.Node, made: dict[str, tuple[str, Step]], held: dict[str, str], model_dir: Path
) -> None:
    """Each artifact a step reads is made by an earlier step or held by the model directory, and of a kind the stage reads."""
    stage = step.stage
    parent = stage.parent_name(step.options) if stage.accepts is not None else None
    for name in step.reads:
        is_parent = name == parent
        line = lines.get("source" if is_parent else "artifacts", stage_node.start_mark.line + 1)
        place = f"{doc.name}:{line}: {stage.name}: "
        how = (f"from '{name}'" if "source" in lines else f"reads '{name}' (its default `from`)") if is_parent else f"measures '{name}'"
        if name in made and made[name][0]:
            kind = made[name][0]
            if is_parent and stage.accepts is not None and kind not in stage.accepts.kinds:
                wanted = " or ".join(KIND_NAMES.get(k, k) for k in stage.accepts.kinds)
                raise VlmoptError(f"{place}{how}: {stage.name} reads {wanted} artifact, and '{name}' is {KIND_NAMES.get(kind, kind)} one")
            continue
        if name in held:
            if is_parent:
                try:
                    stage.check_parent(ModelDir(model_dir).artifact(name, verify=False), step.options)
                except VlmoptError as exc:
                    raise VlmoptError(f"{place}{exc.message}") from None
            continue
        makers = [n for n, (kind, _) in made.items() if kind]
        raise VlmoptError(f"{place}{how}: no earlier step makes it and {model_dir} does not hold it (earlier steps make: {', '.join(makers) or 'nothing'})")


def _gates(doc: _Doc, node: yaml.Node, steps: list[Step]) -> list[Gate]:
    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
        return []
    artifacts = {s.id: s for s in steps if s.makes_artifact}
    measured = {name for s in steps if s.stage.name == "bench" for name in s.reads}
    gates = []
    for kind, kind_node, limits_node in doc.mapping(node, "gates"):
        if kind not in GATES:
            raise doc.fail(kind_node, f"gates: unknown gate '{kind}'{_suggest(kind, list(GATES))} (gates: {', '.join(GATES)})")
        for artifact, artifact_node, limit_node in doc.mapping(limits_node, f"gates: {kind}"):
            place = f"gates: {kind}: "
            if artifact not in artifacts:
                raise doc.fail(artifact_node, f"{place}no step makes '{artifact}'{_suggest(artifact, list(artifacts))} (steps make: {', '.join(artifacts)})")
            if kind in ("min_cosine", "min_speedup") and artifact == "hf":
                raise doc.fail(artifact_node, f"{place}'hf' is the PyTorch reference the others are measured against; gate a derived artifact")
            if kind == "min_speedup" and artifact not in measured:
                raise doc.fail(artifact_node, f"{place}no bench step measures '{artifact}'; add `- bench: {{}}` after the step that makes it")
            limit = doc.value(limit_node)
            if isinstance(limit, bool) or not isinstance(limit, int | float):
                raise doc.fail(limit_node, f"{place}{artifact} takes a number, got {limit!r}")
            limit = float(limit)
            if kind == "min_cosine" and not 0 <= limit <= 1:
                raise doc.fail(limit_node, f"{place}{artifact} must be in [0, 1], got {limit:g}")
            if kind != "min_cosine" and not limit > 0:
                raise doc.fail(limit_node, f"{place}{artifact} must be above 0, got {limit:g}")
            gates.append(Gate(kind, artifact, limit, limit_node.start_mark.line + 1))
    return gates
