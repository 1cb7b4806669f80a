"""``ckpt_path=last``: resume a requeued job from the newest checkpoint in its own run folder, or start fresh.

Used by ``hardware=slurm``, whose run folder has no time stamp, so a requeued job lands in the folder it left.
Candidates (newest modification time wins): ``<output_dir>/checkpoints/last.ckpt`` (epoch end and the SIGTERM
preemption checkpoint), ``checkpoints/periodic/last.ckpt`` (every ``hardware.checkpoint_every_n_steps`` steps) and
``checkpoints/on_exception.ckpt`` (written as the job exits after submitit's requeue signal).
"""

from __future__ import annotations

from pathlib import Path

CANDIDATES = ("checkpoints/last.ckpt", "checkpoints/periodic/last.ckpt", "checkpoints/on_exception.ckpt")


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str | Path) -> str | None:
    """``"last"`` -> the newest existing candidate under ``output_dir`` (None on a first launch); other values unchanged."""
    if ckpt_path != "last":
        return ckpt_path
    found = [p for p in (Path(output_dir) / c for c in CANDIDATES) if p.is_file()]
    return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None
