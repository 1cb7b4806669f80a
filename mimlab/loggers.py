"""Loggers that keep a run's history across resumes, and know about Hydra sweeps.

``wandb_logger`` builds a Lightning ``WandbLogger`` whose run is grouped by sweep (one wandb run per Hydra job, all
jobs of one ``-m`` sweep in one group) and tagged with the job's command-line overrides, so runs of a sweep can be
compared side by side in the wandb UI. Outside a Hydra run (tests, notebooks) it falls back to plain settings. A run
that resumes in its own folder (``ckpt_path`` into it, a requeued SLURM job) continues the folder's wandb run.

:class:`HistoryCSVLogger` appends to ``csv/metrics.csv`` instead of deleting it (Lightning's ``CSVLogger`` deletes a
``metrics.csv`` it finds): a resumed run keeps the rows of the steps before its checkpoint and drops only those it will
log again (:class:`mimlab.callbacks.resume.LogHistory` tells it where training restarts).
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from mimlab.checkpoints.auto_resume import resolve_ckpt_path

log = logging.getLogger(__name__)

# Overrides that say where a run goes, not what it is: left out of tags.
_NOT_TAGS = ("paths.", "hydra.", "data.root=", "ckpt_path=")
_MAX_TAG = 64  # wandb rejects longer tags


def sweep_identity() -> dict[str, Any]:
    """What Hydra knows about the current job: ``{"mode", "sweep", "job_num", "overrides"}``.

    ``sweep`` is the sweep folder relative to its parent's parent (e.g. ``mae_mask_ratio/2026-11-25_22-30-00``) in a
    multirun and ``None`` in a single run; ``overrides`` is the job's override list (``["masking.ratio=0.6", ...]``).
    Returns ``{}`` when no Hydra run is active.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    sweep_dir = Path(hc.sweep.dir)
    return {
        "mode": "multirun" if multirun else "run",
        "sweep": f"{sweep_dir.parent.name}/{sweep_dir.name}" if multirun else None,
        "job_num": int(hc.job.num) if multirun else None,
        "overrides": list(hc.overrides.task),
        "override_dirname": hc.job.override_dirname,
    }


def override_tags(overrides: list[str]) -> list[str]:
    """Overrides as wandb tags: ``masking.ratio=0.6`` stays as it is; output/location overrides are dropped."""
    tags = [o.lstrip("+") for o in overrides if not o.lstrip("+~").startswith(_NOT_TAGS)]
    return [t[:_MAX_TAG] for t in tags]


def previous_wandb_id(save_dir: str | Path) -> str | None:
    """The id of the newest wandb run under ``<save_dir>/wandb`` (``[offline-]run-<time>-<id>`` folders), or None."""
    runs = sorted(Path(save_dir, "wandb").glob("*run-*-*"), key=lambda p: p.name.split("run-", 1)[1])
    return runs[-1].name.rsplit("-", 1)[1] if runs else None


def wandb_logger(
    group: str | None = None,
    tags: list[str] | None = None,
    job_type: str | None = None,
    ckpt_path: str | None = None,
    **kwargs: Any,
) -> WandbLogger:
    """A ``WandbLogger`` (all ``kwargs`` pass through) with sweep-aware defaults.

    ``group`` (null = automatic): the sweep name in a multirun, so every job of a sweep lands in one wandb group.
    ``tags`` (null = automatic): the job's overrides. In a multirun the run ``name`` gets ``[job_num]<overrides>``. ``job_type`` (null = automatic): ``sweep`` or ``run``.
    The overrides and sweep also go into the run config (``hydra/overrides``, ``hydra/sweep``).
    ``ckpt_path`` (the run's): when it resumes a checkpoint and ``save_dir`` holds a wandb run, that run continues (its
    id, ``resume="allow"``; offline runs are synced together by ``wandb sync``) unless ``id`` is given.

    Hydra's basic launcher runs the jobs of a sweep one after another in one process; a wandb run left open by the
    previous job is finished here so that each job gets its own run (Lightning would otherwise reuse it).
    """
    import wandb

    if wandb.run is not None:
        wandb.finish()
    ident = sweep_identity()
    if group is None and ident.get("sweep"):
        group = ident["sweep"]
    if tags is None and ident.get("overrides"):
        tags = override_tags(ident["overrides"])
    if job_type is None and ident:
        job_type = "sweep" if ident["mode"] == "multirun" else "run"
    if ident.get("mode") == "multirun":  # jobs of a sweep share cfg.name: tell them apart by job number and overrides
        kwargs["name"] = f"{kwargs.get('name') or 'job'}[{ident['job_num']}]{ident['override_dirname']}"[:128]
    save_dir = kwargs.get("save_dir")
    if save_dir and kwargs.get("id") is None and resolve_ckpt_path(ckpt_path, save_dir):
        kwargs["id"] = previous_wandb_id(save_dir)
        if kwargs["id"]:
            log.info("resuming in %s: continuing its wandb run %s", save_dir, kwargs["id"])
    config = dict(kwargs.pop("config", None) or {})
    if ident:
        config.setdefault(
            "hydra", {"overrides": ident["overrides"], "sweep": ident["sweep"], "job_num": ident["job_num"]}
        )
    return WandbLogger(group=group, tags=tags, job_type=job_type, config=config or None, **kwargs)


class _HistoryWriter(ExperimentWriter):
    """Lightning's CSV writer, but an existing ``metrics.csv`` is kept: its columns are taken over and new rows are
    appended (a new column rewrites the file with the union, as Lightning does). Lightning's writer deletes the file in
    ``_check_log_dir_exists``; this writer's version of that hook keeps it (tests/test_resume.py checks both)."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = sorted(csv.DictReader(f).fieldnames or [])

    def rewind(self, step: int) -> int:
        """Drop the rows logged at ``step`` or later (a resumed run logs them again); returns how many were kept."""
        if not os.path.isfile(self.metrics_file_path):
            return 0
        with open(self.metrics_file_path, newline="") as f:
            rows = list(csv.DictReader(f))
        kept = [row for row in rows if row.get("step") and int(float(row["step"])) < step]
        if len(kept) < len(rows):
            tmp = f"{self.metrics_file_path}.tmp"
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)
            os.replace(tmp, self.metrics_file_path)
        return len(kept)


class HistoryCSVLogger(CSVLogger):
    """``CSVLogger`` that keeps a run's ``metrics.csv`` across resumes (see module docstring); same arguments."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _HistoryWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _HistoryWriter(log_dir=self.log_dir)
        return self._experiment  # type: ignore[return-value]

    @rank_zero_only
    def rewind(self, step: int) -> None:
        """Training (re)starts at logging step ``step``: rows from that step on belong to a run that is redone."""
        kept = self.experiment.rewind(step)
        if kept:
            log.info(
                "%s: continuing after its %d rows of steps before %d", self.experiment.metrics_file_path, kept, step
            )
