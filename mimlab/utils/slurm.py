"""Checks a ``hardware=slurm`` run before anything is submitted (a Hydra callback set in conf/hardware/slurm.yaml).

Without them a missing ``sbatch`` surfaces as submitit's "Could not detect srun", a wrong partition as sbatch's
"Invalid partition name specified", GPUs asked of a CPU partition as "Invalid generic resource (gres)
specification", and a run without ``-m`` starts training on the login node and fails inside Lightning.
Hydra turns exceptions raised in callbacks into warnings, so a failed check exits with its message instead.

While it waits for the jobs, submitit polls ``sacct``. On a cluster without job accounting every poll fails, and
each failure put four lines into the submitting process's log (sacct's own "Slurm accounting storage is disabled" and
submitit's warning three times): :func:`quiet_sacct` says it once and lets submitit wait on the jobs' result files.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

LOCAL_CLUSTER = "scripts/slurm_local.sh start"
log = logging.getLogger(__name__)


def fail(message: str) -> None:
    sys.exit(f"error: {message}")


def partitions() -> dict[str, dict[str, Any]]:
    """``{name: {"default": bool, "gres": [str, ...]}}`` for each partition the controller reports (``sinfo``)."""
    proc = subprocess.run(["sinfo", "--noheader", "--format=%P|%G"], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        fail(
            f"hardware=slurm: `sinfo` failed ({proc.stderr.strip() or proc.returncode}): the SLURM controller does "
            f"not answer. Check the cluster (or start the local one: {LOCAL_CLUSTER})."
        )
    out: dict[str, dict[str, Any]] = {}
    for line in proc.stdout.split():
        name, gres = line.split("|", 1)
        entry = out.setdefault(name.rstrip("*"), {"default": name.endswith("*"), "gres": []})
        entry["gres"].append(gres)
    return out


class _FirstSacctError(logging.Filter):
    """Lets submitit's first 'Bypassing sacct error' warning through and drops the repeats (one per poll)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "sacct" not in record.getMessage():
            return True
        seen, self.seen = self.seen, True
        return not seen


def quiet_sacct() -> None:
    """Drop submitit's repeated sacct warnings; if ``sacct`` does not answer (no accounting), say so once and stop
    submitit from polling it (it then knows a job has ended from the job's result file, as it does when sacct fails)."""
    submitit_log = logging.getLogger("submitit")
    if not any(isinstance(f, _FirstSacctError) for f in submitit_log.filters):
        submitit_log.addFilter(_FirstSacctError())
    probe = subprocess.run(["sacct", "--noheader", "-X", "-j", "1"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        from submitit.slurm.slurm import SlurmJob

        SlurmJob.watcher._make_command = lambda: None  # type: ignore[method-assign]  # no command: no sacct call
        log.warning(
            "sacct does not answer on this cluster (%s): waiting on the jobs' result files instead of polling it",
            probe.stderr.strip() or f"exit status {probe.returncode}",
        )


class SlurmPreflight(Callback):
    """Before submission (``-m``): ``sbatch`` and ``srun`` on PATH, ``hydra.launcher.partition`` exists, GPUs are
    asked only of a partition that has them; then :func:`quiet_sacct`. Without ``-m`` outside a SLURM allocation: says
    to add ``-m``."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        missing = [tool for tool in ("sbatch", "srun", "sinfo") if shutil.which(tool) is None]
        if missing:
            verb = "is" if len(missing) == 1 else "are"
            fail(
                f"hardware=slurm submits SLURM jobs, but {', '.join(missing)} {verb} not on PATH. Run on a SLURM "
                f"login node (or start a local one-node cluster: {LOCAL_CLUSTER}); without SLURM use hardware=cpu, "
                "gpu or ddp."
            )
        launcher = config.hydra.launcher
        known = partitions()
        name = launcher.get("partition")
        if name is None:
            name = next((n for n, p in known.items() if p["default"]), None)
        elif str(name) not in known:
            fail(
                f"hydra.launcher.partition={name}: no such partition on this cluster (sinfo lists: "
                f"{', '.join(known) or 'none'}). Set it to one of them, or to null for the default partition."
            )
        gpus = launcher.get("gpus_per_node")
        if gpus and name is not None and not any("gpu" in gres for gres in known[str(name)]["gres"]):
            fail(
                f"hydra.launcher.gpus_per_node={gpus}, but partition {name} has no GPUs (sinfo gres: "
                f"{', '.join(known[str(name)]['gres'])}). For CPU jobs set hardware.accelerator=cpu "
                "hydra.launcher.gpus_per_node=null; for GPU jobs pick a GPU partition (hydra.launcher.partition=...)."
            )
        quiet_sacct()

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if "SLURM_JOB_ID" not in os.environ:
            fail(
                "hardware=slurm submits through Hydra's submitit launcher, which runs only in multirun mode: add -m "
                "(python -m mimlab.train -m experiment=... hardware=slurm ...)."
            )
