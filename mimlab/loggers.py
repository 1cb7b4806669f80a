"""Logger factories that know about Hydra sweeps.

``wandb_logger`` builds a Lightning ``WandbLogger`` whose run is grouped by sweep (one wandb run per Hydra job, all
jobs of one ``-m`` sweep in one group) and tagged with the job's command-line overrides, so runs of a sweep can be
compared side by side in the wandb UI. Outside a Hydra run (tests, notebooks) it falls back to plain settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger

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


def wandb_logger(
    group: str | None = None, tags: list[str] | None = None, job_type: str | None = None, **kwargs: Any
) -> WandbLogger:
    """A ``WandbLogger`` (all ``kwargs`` pass through) with sweep-aware defaults.

    ``group`` (null = automatic): the sweep name in a multirun, so every job of a sweep lands in one wandb group.
    ``tags`` (null = automatic): the job's overrides. In a multirun the run ``name`` gets ``[job_num]<overrides>``. ``job_type`` (null = automatic): ``sweep`` or ``run``.
    The overrides and sweep also go into the run config (``hydra/overrides``, ``hydra/sweep``).

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
    config = dict(kwargs.pop("config", None) or {})
    if ident:
        config.setdefault(
            "hydra", {"overrides": ident["overrides"], "sweep": ident["sweep"], "job_num": ident["job_num"]}
        )
    return WandbLogger(group=group, tags=tags, job_type=job_type, config=config or None, **kwargs)
