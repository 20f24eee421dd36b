"""Stops vlmopt commands right after each commit step in turn, and records what is left and what settles it.

Run by tests/test_kill_points.py as `python killpoints.py PLAN.json RESULT.json`, in a fresh
process whose torch runs on one thread, so that it has no thread pool when this forks.

For each case of the plan and N = 1, 2, ...: copy the case's `before` directory to `work`, fork a
child that runs the command with the commit primitives wrapped (`os.replace`, `os.rename`,
`os.unlink`, `os.rmdir`, `os.mkdir`, `os.fsync` and `shutil.rmtree`, as called by
vlmopt.workspace) so that it SIGKILLs itself (`kill`) or raises KeyboardInterrupt (`interrupt`)
right after the Nth call; record the directory, then run the case's `settle` commands
(`info`: `info --verify --json`; `rerun`: the command again) in order, each in its own child,
recording its exit code, output and the directory after it. Stop after the first N at which the command completed.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"

PRIMITIVES = ((os, "replace"), (os, "rename"), (os, "unlink"), (os, "rmdir"), (os, "mkdir"), (os, "fsync"), (shutil, "rmtree"))


def state(folder: Path) -> dict[str, Any] | None:
    """The directory's content, every path with a hash; the manifest without what differs between identical runs (times)."""
    if not folder.exists():
        return None
    result: dict[str, Any] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_dir():
            result[rel] = "<dir>"
        elif rel == "vlmopt.json":
            data = json.loads(path.read_text())
            for artifact in data.get("artifacts", {}).values():
                artifact.pop("created", None)
                for record in artifact.get("files", []):
                    record.pop("mtime_ns", None)
            result[rel] = data
        else:
            result[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return result


def _describe(name: str, args: tuple[Any, ...]) -> str:
    shown = []
    for value in args:
        if isinstance(value, int) and name == "fsync":
            with_path = Path(f"/proc/self/fd/{value}")
            shown.append(Path(os.readlink(with_path)).name if with_path.exists() else str(value))
        elif isinstance(value, (str, os.PathLike)):
            shown.append(Path(value).name)
    return f"{name}({', '.join(shown)})"


def _stop_after(step: int, mode: str, note: Path) -> None:
    """Wrap the commit primitives so that the process stops right after the `step`th call from vlmopt.workspace."""
    calls = 0
    for module, name in PRIMITIVES:
        original = getattr(module, name)

        def wrapper(*args: Any, _original: Any = original, _name: str = name, **kwargs: Any) -> Any:
            nonlocal calls
            result = _original(*args, **kwargs)
            if sys._getframe(1).f_globals.get("__name__") == "vlmopt.workspace":
                calls += 1
                if calls == step:
                    note.write_text(_describe(_name, args))
                    if mode == "kill":
                        os.kill(os.getpid(), signal.SIGKILL)
                    raise KeyboardInterrupt
            return result

        setattr(module, name, wrapper)


def _vlmopt(argv: list[str]) -> int:
    """`vlmopt argv` through the entry point a shell runs; its exit code."""
    from vlmopt.cli import main

    sys.argv = ["vlmopt", *argv]
    try:
        main()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return 0


def _pause_before(module: Any, name: str, when: Callable[..., bool], paused: Path, go: Path) -> None:
    """Make the first call of `module.name` for which `when(frame_module, *args)` holds wait, after touching `paused`, until `go` exists."""
    original = getattr(module, name)
    waited = False

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal waited
        if not waited and when(sys._getframe(1).f_globals.get("__name__"), *args):
            waited = True
            paused.touch()
            while not go.exists():
                time.sleep(0.01)
        return original(*args, **kwargs)

    setattr(module, name, wrapper)


def _in_child(
    argv: list[str],
    log: Path,
    step: int | None = None,
    mode: str = "kill",
    note: Path | None = None,
    hook: Callable[[], None] | None = None,
    wait: bool = True,
) -> int:
    """Run `vlmopt argv` in a forked child; its exit code, or minus the signal that ended it (without `wait`: its pid)."""
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            if step is not None:
                _stop_after(step, mode, note)
            if hook is not None:
                hook()
            code = _vlmopt(argv)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return _wait(pid) if wait else pid


def _wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _until(path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)


def run_race(case: dict[str, Any], logs: Path) -> dict[str, Any]:
    """Two runs of the command into the same new folder, interleaved at the worst moment: the second
    checks that the folder does not exist, then waits; the first creates it, takes the lock and builds
    its artifact up to its first commit step, then waits; the second goes on (and is refused the
    lock), and only when it has exited does the first go on."""
    work = Path(case["work"])
    shutil.rmtree(work, ignore_errors=True)
    flags = logs / f"{case['id']}.flags"
    shutil.rmtree(flags, ignore_errors=True)
    flags.mkdir()
    second = _in_child(
        _argv(case),
        logs / f"{case['id']}.second.log",
        hook=lambda: _pause_before(os, "mkdir", lambda _, path, *rest: Path(path) == work, flags / "second-paused", flags / "second-go"),
        wait=False,
    )
    _until(flags / "second-paused")
    first = _in_child(
        _argv(case),
        logs / f"{case['id']}.first.log",
        hook=lambda: _pause_before(os, "replace", lambda caller, *args: caller == "vlmopt.workspace", flags / "first-paused", flags / "first-go"),
        wait=False,
    )
    _until(flags / "first-paused")
    (flags / "second-go").touch()
    second_exit = _wait(second)
    (flags / "first-go").touch()
    first_exit = _wait(first)
    info = logs / f"{case['id']}.info.log"
    info_exit = _in_child(["info", str(work), "--verify", "--json"], info)
    return {
        "first": {"exit": first_exit, "output": (logs / f"{case['id']}.first.log").read_text()[-1500:]},
        "second": {"exit": second_exit, "output": (logs / f"{case['id']}.second.log").read_text()[-1500:]},
        "info": {"exit": info_exit, "output": info.read_text()[-1500:]},
    }


def _warm_up(cases: list[dict[str, Any]], logs: Path) -> None:
    """Run each command once here, so that every child starts with its modules imported. torch runs on
    one thread (OMP_NUM_THREADS, set before it is imported): no thread pool for the children to inherit."""
    for case in cases:
        if case.get("race"):
            continue
        work = Path(case["work"])
        shutil.rmtree(work, ignore_errors=True)
        if case["before"]:
            shutil.copytree(case["before"], work)
        log = logs / f"{case['id']}.warm-up.log"
        with open(log, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            _vlmopt(_argv(case))


def _argv(case: dict[str, Any]) -> list[str]:
    return [a.replace("{work}", case["work"]) for a in case["command"]]


def run_case(case: dict[str, Any], logs: Path) -> list[dict[str, Any]]:
    work = Path(case["work"])
    settle = {"info": ["info", str(work), "--verify", "--json"], "rerun": _argv(case)}
    steps = []
    for step in range(1, case.get("max_steps", 60) + 1):
        shutil.rmtree(work, ignore_errors=True)
        if case["before"]:
            shutil.copytree(case["before"], work)
        prefix = logs / f"{case['id']}-{step}"
        note = Path(f"{prefix}.step")
        record: dict[str, Any] = {"step": step, "exit": _in_child(_argv(case), Path(f"{prefix}.log"), step, case["mode"], note)}
        record["call"] = note.read_text() if note.exists() else None
        record["log"] = Path(f"{prefix}.log").read_text()
        record["after_stop"] = state(work)
        record["settled"] = []
        for index, what in enumerate(case["settle"]):
            log = Path(f"{prefix}.{index}-{what}.log")
            code = _in_child(settle[what], log)
            record["settled"].append({"command": what, "exit": code, "state": state(work), "output": log.read_text()[-1500:]})
        steps.append(record)
        if record["call"] is None:  # the command completed before its Nth commit step
            break
    return steps


def main(plan_path: str, result_path: str) -> None:
    plan = json.loads(Path(plan_path).read_text())
    logs = Path(plan["logs"])
    logs.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    _warm_up(plan["cases"], logs)
    gc.freeze()  # fewer pages for the children to copy on write
    results: dict[str, Any] = {"seconds": {"warm-up": time.monotonic() - started}}
    for case in plan["cases"]:
        started = time.monotonic()
        if case.get("race"):
            results[case["id"]] = run_race(case, logs)
        else:
            results[case["id"]] = {"before": state(Path(case["before"])) if case["before"] else None, "steps": run_case(case, logs)}
        results["seconds"][case["id"]] = time.monotonic() - started
    Path(result_path).write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:3])
