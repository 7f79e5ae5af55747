"""A training run owns its output directory: one writing process (a lock file) and one run (no mixing).

`claim_output_dir(cfg, accelerator)` is entered by `scripts/finetune.py` around the whole run. On the main
process it takes the lock (`RunLock`: `<output_dir>/.mllm_mer.lock` with pid, host, boot id and process
start time; a lock whose process is gone or whose pid now belongs to another process is stale and taken
over with a warning) and then checks what the directory holds:

- nothing (or only the lock): the run starts;
- `train.overwrite=true`: everything there is moved aside first, into `<output_dir>.replaced-<time>` beside it
  (nothing is deleted; remove it when no longer needed);
- `train.resume_from` set: the directory must hold the same run (its `config.yaml`, or else its latest
  checkpoint's record, has the same identity, `mllm_mer.training.identity`);
- otherwise: refused, naming what is there (its settings that differ, its checkpoints and final step) and
  the ways out.

The other ranks of a distributed run (started together by `accelerate launch`) share the main process's
lock and take its verdict: a refusal is raised on every rank, so none is left waiting.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from mllm_mer.config import RUN_CONFIG, ConfigError, RunConfig, load_config
from mllm_mer.run_files import RunFileError
from mllm_mer.training.checkpoint import complete_checkpoints, read_marker
from mllm_mer.training.identity import differences, run_settings, summarize

log = logging.getLogger(__name__)

LOCK_FILE = ".mllm_mer.lock"
"""The lock inside a run directory while a training process writes it."""
FINAL_METRICS = "final_metrics.json"


class RunDirError(ValueError):
    """The output directory cannot be used by this run (one line: what is there, what to do)."""


# --------------------------------------------------------------------------------------------- lock
def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of process `pid` from /proc (None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


@dataclass(frozen=True)
class LockOwner:
    """Who holds a run directory's lock.

    Attributes:
        pid: process id.
        host: host name.
        boot_id: the kernel's boot id (a reboot makes every old pid meaningless); None off Linux.
        start_ticks: the process's start time (clock ticks since boot; tells a reused pid apart); None off Linux.
        since: when the lock was taken (local time, for messages).
    """

    pid: int
    host: str
    boot_id: str | None
    start_ticks: int | None
    since: str

    @classmethod
    def current(cls) -> LockOwner:
        stat = _proc_stat(os.getpid())
        return cls(os.getpid(), socket.gethostname(), _boot_id(), stat[1] if stat else None,
                   time.strftime("%Y-%m-%d %H:%M:%S"))

    def status(self) -> str:
        """"alive", "gone" (no such process, a zombie, or the host rebooted), "reused" (the pid now belongs
        to a process started later) or "unknown" (another host: cannot be checked from here)."""
        if self.host != socket.gethostname():
            return "unknown"
        boot = _boot_id()
        if self.boot_id and boot and boot != self.boot_id:
            return "gone"
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return "gone"
        except PermissionError:
            pass  # a process of another user
        stat = _proc_stat(self.pid)
        if stat is not None and stat[0] == "Z":
            return "gone"
        if stat is not None and self.start_ticks is not None and stat[1] != self.start_ticks:
            return "reused"
        return "alive"

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host} since {self.since}"


def _read_owner(path: Path) -> LockOwner | None:
    """The owner written in lock file `path`; None when it cannot be read as one."""
    try:
        return LockOwner(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


class RunLock:
    """An exclusive lock on a run directory held by this process (`acquire`, then `release`)."""

    def __init__(self, path: Path, owner: LockOwner) -> None:
        self.path = path
        self.owner = owner

    @classmethod
    def acquire(cls, directory: Path) -> RunLock:
        """Create `<directory>/.mllm_mer.lock` for this process; a stale lock is taken over with a warning.

        Raises:
            RunDirError: a live process (or one on another host, which cannot be checked) holds the lock, or the
                lock file cannot be read.
        """
        path = directory / LOCK_FILE
        me = LockOwner.current()
        for _ in range(5):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w") as fh:
                    fh.write(json.dumps(asdict(me)))
                return cls(path, me)
            held = _read_owner(path)
            if held is None:
                if not path.exists():
                    continue  # released meanwhile
                raise RunDirError(f"{directory} is locked by {path}, which cannot be read: if no training process "
                                  "writes this directory, delete that file")
            status = held.status()
            if status in ("alive", "unknown"):
                where = "" if status == "alive" else f" (cannot be checked from {me.host})"
                raise RunDirError(
                    f"train.output_dir={directory} is in use by another training process, {held.describe()}{where}: "
                    f"wait for it to end or choose another train.output_dir; if that process no longer runs, "
                    f"delete {path}")
            _break_stale(path, held)
            log.warning("took over the stale lock %s of %s (process %s)", path, held.describe(),
                        "gone" if status == "gone" else "gone, its pid reused")
        raise RunDirError(f"could not lock {directory}: {path} keeps changing (several processes starting at once?)")

    def release(self) -> None:
        """Remove the lock file if it is still this process's."""
        if _read_owner(self.path) == self.owner:
            self.path.unlink(missing_ok=True)


def _break_stale(path: Path, stale: LockOwner) -> None:
    """Remove the stale lock `path` of `stale`; a lock another process took meanwhile is put back."""
    aside = path.with_name(f"{path.name}.stale-{os.getpid()}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return  # another process broke it first
    taken = _read_owner(aside)
    if taken != stale:  # a new owner's lock was moved: put it back (unless yet another one exists)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "w") as fh:
                fh.write(aside.read_text())
        except FileExistsError:
            pass
    aside.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------- contents
def run_entries(directory: Path) -> list[str]:
    """Names in `directory` except lock files, sorted."""
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith(LOCK_FILE))


@dataclass
class ExistingRun:
    """What an output directory holds.

    Attributes:
        entries: its names (lock files left out).
        identity, settings: the run's (`run_settings`), from its config.yaml or else its latest checkpoint's
            record; None when neither can be read.
        steps: steps of its complete checkpoints.
        final_step: the step in its final_metrics.json (a finished run), or None.
    """

    entries: list[str]
    identity: dict[str, Any] | None
    settings: dict[str, Any] | None
    steps: list[int]
    final_step: int | None

    @property
    def is_run(self) -> bool:
        return self.identity is not None or bool(self.steps) or RUN_CONFIG in self.entries

    def describe(self) -> str:
        """E.g. "a run finished at step 360 (complete checkpoints at steps 300, 360)"."""
        if not self.is_run:
            shown = ", ".join(self.entries[:5]) + (", ..." if len(self.entries) > 5 else "")
            return f"files that are not an mllm_mer run ({shown})"
        state = f"finished at step {self.final_step}" if self.final_step is not None else "not finished"
        ckpts = f"complete checkpoints at steps {', '.join(map(str, self.steps))}" if self.steps else "no checkpoint"
        return f"a run {state} ({ckpts})"


def describe_existing(directory: Path) -> ExistingRun:
    """Read what `directory` holds: its entries, the run's settings, its checkpoints and final step."""
    done = complete_checkpoints(directory)
    saved = None
    try:
        saved = run_settings(load_config(directory / RUN_CONFIG, saved_run=True))
    except ConfigError:  # no config.yaml (or one that cannot be read): the latest checkpoint's record
        for _, path in reversed(done):
            try:
                record = read_marker(path).get("run")
            except RunFileError:
                continue
            if isinstance(record, dict) and isinstance(record.get("identity"), dict):
                saved = (record["identity"], record.get("settings") or {})
                break
    final_step = None
    try:
        final_step = int(json.loads((directory / FINAL_METRICS).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return ExistingRun(run_entries(directory), saved[0] if saved else None, saved[1] if saved else None,
                       [s for s, _ in done], final_step)


def move_aside(directory: Path, entries: list[str]) -> Path:
    """Move `entries` of `directory` into a new `<directory>.replaced-<time>` beside it; returns that folder."""
    base = directory.resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = base.with_name(f"{base.name}.replaced-{stamp}")
    n = 1
    while target.exists():
        target = base.with_name(f"{base.name}.replaced-{stamp}-{n}")
        n += 1
    target.mkdir()
    for name in entries:
        os.replace(directory / name, target / name)
    return target


def check_contents(cfg: RunConfig, directory: Path) -> Path | None:
    """Apply the rules of the module docstring to what `directory` holds (the lock already taken).

    Returns:
        Where the previous contents were moved (`train.overwrite=true`), or None.
    Raises:
        RunDirError: the directory holds another run, or files that are not a run (one line).
    """
    entries = run_entries(directory)
    if not entries:
        return None
    if cfg.train.overwrite:
        return move_aside(directory, entries)
    there = describe_existing(directory)
    identity, settings = run_settings(cfg)
    diff = differences(there.identity, identity) if there.identity is not None else []
    elsewhere = "choose another train.output_dir"
    replace = f"replace it with train.overwrite=true (moves its files to {directory}.replaced-<time>)"
    if cfg.train.resume_from is not None:
        if there.identity is not None and not diff:
            return None
        if there.identity is None:
            raise RunDirError(
                f"train.resume_from={cfg.train.resume_from} but train.output_dir={directory} holds "
                f"{there.describe()} whose settings cannot be read (no readable {RUN_CONFIG} or checkpoint "
                f"record): {replace}, or {elsewhere}")
        raise RunDirError(
            f"train.resume_from={cfg.train.resume_from} would continue the run in {directory}, whose settings "
            f"differ ({summarize(diff)}; saved -> now): resume with its settings, {replace}, or {elsewhere}")
    if not there.is_run:
        raise RunDirError(f"train.output_dir={directory} is not empty: it holds {there.describe()}; {elsewhere}, "
                          "or set train.overwrite=true to move them aside")
    changed = [line for line in differences(there.settings or {}, settings) if not line.startswith("train.output_dir:")]
    if there.identity is None:
        what = f"whose settings cannot be read (no readable {RUN_CONFIG})"
        ways = f"{replace}, or {elsewhere}"
    elif diff:
        what = f"with other settings ({summarize(diff + changed)}; saved -> now)"
        ways = f"{replace}, or {elsewhere}"
    else:
        what = "with the same settings" + (f" except {summarize(changed)}" if changed else "")
        ways = f"continue it with train.resume_from=latest, {replace}, or {elsewhere}"
    raise RunDirError(f"train.output_dir={directory} already holds {there.describe()} {what}: {ways}")


def _claim(cfg: RunConfig) -> RunLock:
    """Lock the output directory and check its contents (main process)."""
    directory = Path(cfg.train.output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    lock = RunLock.acquire(directory)
    try:
        moved = check_contents(cfg, directory)
    except BaseException:
        lock.release()
        raise
    if moved is not None:
        print(f"train.overwrite=true: moved the previous contents of {directory} to {moved} (delete it when "
              "no longer needed)")
    return lock


@contextmanager
def claim_output_dir(cfg: RunConfig, accelerator: Accelerator) -> Iterator[None]:
    """Own `train.output_dir` for the block: lock it and check its contents on the main process (see the
    module docstring); every rank gets the same verdict. The lock is released when the block ends.

    Raises:
        RunDirError: on every rank, when the main process refuses the directory.
    """
    lock, error = None, None
    if accelerator.is_main_process:
        try:
            lock = _claim(cfg)
        except (RunDirError, OSError) as exc:
            error = str(exc)
    if accelerator.num_processes > 1:
        error = broadcast_object_list([error])[0]
    if error is not None:
        raise RunDirError(error)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
