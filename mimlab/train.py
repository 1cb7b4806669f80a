"""The one entry point: ``mimlab-train experiment=<recipe> [overrides]`` (or ``python -m mimlab.train``; Hydra,
``-m`` for sweeps, ``--help`` lists the config groups).

Instantiates the DataModule, the task LightningModule, callbacks, loggers and the Trainer from the composed config,
fits, and prints where the checkpoints, logs and pictures went.
"""

from __future__ import annotations

import re
import signal
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from mimlab.callbacks.resume import LogHistory, PreemptionCheckpoint, RNGState
from mimlab.callbacks.run_metadata import RunMetadata
from mimlab.callbacks.throughput import WallClockThroughput
from mimlab.checkpoints.atomic import AtomicCheckpointIO
from mimlab.checkpoints.auto_resume import resolve_ckpt_path
from mimlab.checkpoints.compat import check_resume_config
from mimlab.run_folder import RunFolder, claim_for_rank_zero, held
from mimlab.tasks.pretrain import MaskedPretraining
from mimlab.utils import resolvers  # noqa: F401  (registers ${mimlab.dirname:...} used by conf/train.yaml)
from mimlab.utils.devices import check_devices
from mimlab.utils.extras import MissingExtraError, require
from mimlab.utils.fast_paths import apply_fast_paths
from mimlab.utils.options import empty_override_messages, validate_options
from mimlab.utils.peers import peer_lost
from mimlab.utils.refusal import Refusal

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def instantiate_part(node: Any, **kwargs: Any) -> Any:
    """Hydra ``instantiate``, letting the part's own error through: a constructor that rejects its arguments says
    why in its own words (naming the key or folder); Hydra's wrapper is kept only for signature mismatches."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if err.__cause__ is None or isinstance(err.__cause__, TypeError):
            raise
        raise err.__cause__ from None


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    """Instantiate (datamodule, module, trainer) from a composed config; nothing is read from disk yet."""
    check_devices(cfg.hardware)
    torch.set_float32_matmul_precision(cfg.hardware.matmul_precision)
    datamodule = instantiate_part(cfg.data)
    module = instantiate_part(cfg.task)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    infrastructure = [
        RunMetadata(resolved),  # type: ignore[arg-type]
        RNGState(),
        LogHistory(),
        PreemptionCheckpoint(f"{cfg.paths.output_dir}/checkpoints"),
        instantiate_part(cfg.guard),
    ]
    callbacks = [instantiate_part(c) for c in cfg.callbacks.values() if c is not None] + infrastructure  # null: off
    loggers = [instantiate_part(c) for c in cfg.logger.values()]
    plugins = [AtomicCheckpointIO(), *(instantiate_part(cfg.hardware.get("plugins")) or [])]  # e.g. SLURMEnvironment
    trainer = instantiate_part(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins)
    return datamodule, module, trainer


def preflight(cfg: DictConfig, module: L.LightningModule) -> RunFolder | None:
    """Checks that need no data and no training: resume compatibility, composition fit; then the run folder is
    claimed for this run (writable, not in use, not holding another run: :mod:`mimlab.run_folder`)."""
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, cfg.paths.output_dir)
    if ckpt_path:
        check_resume_config(ckpt_path, OmegaConf.to_container(cfg, resolve=True), cfg.allow_config_change)  # type: ignore[arg-type]
    if isinstance(module, MaskedPretraining):  # its parts are composed from the config: try them together
        size = cfg.data.img_size
        module.check_composition((size, size))
    return claim_for_rank_zero(cfg.paths.output_dir, cfg.ckpt_path)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Fit the composed experiment; returns the final metrics and the artefact paths. However it ends, the run folder's
    claim records how (finished, interrupted, failed, refused: :mod:`mimlab.run_folder`), also when the run fails while
    being built or a check refuses it after the folder was claimed (by :class:`~mimlab.run_folder.RunFolderGuard`)."""
    trainer: L.Trainer | None = None
    status, error = "failed", None
    try:
        validate_options(cfg)
        L.seed_everything(cfg.seed, workers=True)
        datamodule, module, trainer = build(cfg)
        preflight(cfg, module)
        fit_module = apply_fast_paths(module, cfg.hardware)
        trainer.fit(fit_module, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg.ckpt_path, cfg.paths.output_dir))  # type: ignore[arg-type]
        status = "finished"
    except (SIGTERMException, KeyboardInterrupt):
        status = "interrupted"
        raise
    except BaseException as err:
        status = "refused" if isinstance(err, Refusal) else "failed"
        error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        lost = peer_lost(err, trainer, cfg.paths.output_dir) if trainer is not None else None
        if lost is not None:
            raise lost from err
        raise
    finally:
        claim = held(cfg.paths.output_dir)
        if claim is not None:
            claim.release(status, trainer.global_step if trainer is not None else None, error)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    artefacts = _artefacts(trainer)
    _print_summary(cfg, trainer, metrics, artefacts)
    return {"metrics": metrics, **artefacts}


def _artefacts(trainer: L.Trainer) -> dict[str, Any]:
    out: dict[str, Any] = {"run_dir": trainer.default_root_dir}
    ckpt = trainer.checkpoint_callback
    if ckpt is not None:
        out["last_checkpoint"] = ckpt.last_model_path or None  # type: ignore[attr-defined]
        out["best_checkpoint"] = ckpt.best_model_path or None  # type: ignore[attr-defined]
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if getattr(callback, "last_path", None) is not None:  # a panel: named by what it draws
            out[callback.picture] = str(callback.last_path)
    out["logs"] = [lg.log_dir if hasattr(lg, "log_dir") and lg.log_dir else lg.save_dir for lg in trainer.loggers]
    return out


@rank_zero_only
def _print_summary(cfg: DictConfig, trainer: L.Trainer, metrics: dict, artefacts: dict) -> None:
    from rich.console import Console

    console = Console(soft_wrap=True)
    console.rule(f"mimlab run '{cfg.name}' finished after {trainer.global_step} steps")
    shown = [k for k in metrics if k == "train/loss_epoch" or k.split("/")[0] in ("val", "knn", "probe")]
    for key in sorted(shown, key=lambda k: (k.count("_"), k))[
        :12
    ]:  # headline metrics first (val/mIoU before val/mIoU_x)
        console.print(f"{key:>20}: {metrics[key]:.4f}")
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, WallClockThroughput) and callback.summary():
            console.print(f"{'throughput':>20}: {callback.summary()}", highlight=False)
    for key, value in artefacts.items():
        if value:
            shown = ", ".join(map(str, value)) if isinstance(value, list) else str(value)  # type: ignore[assignment]
            console.print(f"{key.replace('_', ' '):>20}: {shown}", highlight=False)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        result = run(cfg)
    except SIGTERMException as stop:  # preempted or Ctrl-C: the checkpoint is saved; exit like a process ended by
        sys.exit(stop.code or 128 + signal.SIGTERM)  # that signal (143, 130) so schedulers requeue
    return result["metrics"].get("val/loss")


def require_launcher(args: list[str]) -> None:
    """Exit with the extra to install when the overrides pick Hydra's submitit launcher (``hardware=slurm``,
    ``hydra/launcher=submitit_*``) and it is not installed: without it Hydra only says the config is missing."""
    picked = [a for a in args if re.fullmatch(r"\+{0,2}(hardware=.*\bslurm\b.*|hydra/launcher=.*\bsubmitit.*)", a)]
    if picked:
        try:
            require("hydra_plugins.hydra_submitit_launcher", f"{picked[0]} (SLURM jobs through submitit)")
        except MissingExtraError as err:
            sys.exit(str(err))


def cli() -> None:
    """``mimlab-train`` / ``python -m mimlab.train``: check the launcher extra, name empty values and misspelled keys
    (with a suggestion), then hand over to Hydra."""
    from mimlab.utils.config_keys import unknown_key_messages

    require_launcher(sys.argv[1:])
    problems = empty_override_messages(sys.argv[1:]) + unknown_key_messages(CONFIG_DIR, "train", sys.argv[1:])
    if problems:
        sys.exit("\n".join(problems))
    main()


if __name__ == "__main__":
    cli()
