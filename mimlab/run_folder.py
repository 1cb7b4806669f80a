"""One run per run folder: a run claims its folder before writing into it, so a folder is never shared or reused.

* Two runs at once: the first holds an exclusive lock (``fcntl.flock`` on ``<folder>/.mimlab-run.lock``; the OS
  releases it when the process ends, even on SIGKILL); the second is refused, naming the folder and the holder.
* A folder that holds a run (a ``checkpoints/**/*.ckpt`` or ``csv/metrics.csv``) is refused to a new run. It is reused only to resume that run explicitly: ``ckpt_path`` pointing into the folder, or
  ``ckpt_path=last`` while the run has not finished (a requeued SLURM job).
* ``.mimlab-run.json`` records the run's status (running, finished, interrupted, failed, refused: see
  :mod:`mimlab.utils.refusal`), step, pid, host and times, and the error that ended a failed or refused run.

Only rank 0 claims (other ranks of the same run write where it claimed). :class:`RunFolderGuard` (a Hydra callback,
``hydra.callbacks`` in ``conf/train.yaml``) claims in ``on_run_start``, before Hydra writes ``.hydra/``; runs started
without Hydra's run mode (sweeps, tests) claim in :func:`mimlab.train.preflight`.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from mimlab.utils.refusal import Refusal

STATE = ".mimlab-run.json"
LOCK = ".mimlab-run.lock"
_CLAIMED: dict[Path, RunFolder] = {}


class RunFolderError(Refusal, RuntimeError):
    """The run folder is in use or holds another run; the message names it and what to do."""


def _read_state(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / STATE).read_text())
    except (OSError, ValueError):
        return {}


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def previous_run(folder: Path) -> dict[str, Any] | None:
    """The run that used ``folder``, if it left anything to lose (a checkpoint or ``csv/metrics.csv``): its state
    record, or ``{"status": "unknown"}`` when it has none; None for an unused folder."""
    if not ((folder / "csv" / "metrics.csv").is_file() or any((folder / "checkpoints").rglob("*.ckpt"))):
        return None
    return _read_state(folder) or {"status": "unknown"}


def _describe(state: dict[str, Any]) -> str:
    said = [state.get("status", "unknown")]
    if state.get("step") is not None:
        said.append(f"at step {state['step']}")
    if state.get("started"):
        said.append(f"started {state['started']}")
    return ", ".join(said)


def _may_resume_in(folder: Path, ckpt_path: str | None, state: dict[str, Any]) -> bool:
    if ckpt_path == "last":
        return state.get("status") != "finished"
    return ckpt_path is not None and folder.resolve() in Path(ckpt_path).resolve().parents


class RunFolder:
    """This process's claim on a run folder (see module docstring); :meth:`claim` to get one."""

    def __init__(self, folder: Path, lock: Any, state: dict[str, Any]) -> None:
        self.folder, self._lock, self.state = folder, lock, state

    @classmethod
    def claim(cls, folder: str | Path, ckpt_path: str | None = None) -> RunFolder:
        """Lock ``folder`` for this run and mark it running; raise :class:`RunFolderError` if another run holds it or
        used it (unless this run resumes it, see module docstring), ``PermissionError`` if it cannot be written."""
        folder = Path(os.path.abspath(folder))
        if folder in _CLAIMED:
            return _CLAIMED[folder]
        try:
            folder.mkdir(parents=True, exist_ok=True)
            lock = open(folder / LOCK, "a+")  # held open for the whole run
        except OSError as err:
            raise PermissionError(
                f"run folder {folder} is not writable ({err.strerror}); "
                "choose another with hydra.run.dir=/writable/path"
            ) from err
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            holder = _read_state(folder)
            raise RunFolderError(
                f"run folder {folder} is in use by another run (pid {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')}, started {holder.get('started', '?')}). Two runs never share a folder: "
                "wait for that run to end, or start this one in another folder (hydra.run.dir=...)."
            ) from None
        state = previous_run(folder)
        if state is not None and not _may_resume_in(folder, ckpt_path, state):
            lock.close()
            last = folder / "checkpoints" / "last.ckpt"
            raise RunFolderError(
                f"run folder {folder} already holds a run ({_describe(state)}). A new run never reuses a run folder: "
                "start it in a new one (the default time-stamped folder, or hydra.run.dir=...), or continue that run "
                f"explicitly with ckpt_path={last}."
            )
        claim = cls(
            folder,
            lock,
            {
                "status": "running",
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": _now(),
                "resumed_from": ckpt_path,
                "step": None,
            },
        )
        claim._write()
        _CLAIMED[folder] = claim
        return claim

    def _write(self) -> None:
        tmp = self.folder / f"{STATE}.tmp"
        tmp.write_text(json.dumps(self.state, indent=2))
        os.replace(tmp, self.folder / STATE)

    def release(self, status: str, step: int | None = None, error: str | None = None) -> None:
        """Record how the run ended (``finished``, ``interrupted``, ``failed``, ``refused``; ``error``: what ended it)
        and unlock the folder."""
        self.state.update(status=status, step=step, ended=_now())
        if error:
            self.state["error"] = error
        self._write()
        self._lock.close()
        _CLAIMED.pop(self.folder, None)


def held(folder: str | Path) -> RunFolder | None:
    """This process's claim on ``folder`` (made by :class:`RunFolderGuard` or :func:`claim_for_rank_zero`), if any."""
    return _CLAIMED.get(Path(os.path.abspath(folder)))


def claim_for_rank_zero(folder: str | Path, ckpt_path: str | None) -> RunFolder | None:
    """:meth:`RunFolder.claim` on global rank 0 (read from the launcher's environment); None on other ranks."""
    if rank_zero_only.rank != 0 or int(os.environ.get("NODE_RANK", 0)) != 0:  # type: ignore[attr-defined]
        return None
    return RunFolder.claim(folder, ckpt_path)


class RunFolderGuard(Callback):
    """Hydra callback: claim ``hydra.run.dir`` before Hydra writes ``.hydra/`` into it (single runs)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            claim_for_rank_zero(config.hydra.run.dir, config.get("ckpt_path"))
        except (RunFolderError, PermissionError) as err:
            raise SystemExit(f"Error: {err}") from None  # Hydra turns a callback's exceptions into warnings
