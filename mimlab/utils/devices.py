"""Fail before the Trainer is built when the hardware group asks for more GPUs than this machine has."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, ListConfig

GPU_ACCELERATORS = ("gpu", "cuda")


def requested_gpus(devices: object, available: int) -> int:
    """How many GPUs ``hardware.devices`` asks for: a count, -1 / "auto" (all), or indices ("0,3" or [0, 3])."""
    if devices in (-1, "-1", "auto"):
        return available
    if isinstance(devices, (list, tuple, ListConfig)) or (isinstance(devices, str) and "," in devices):
        indices = [int(i) for i in (devices.split(",") if isinstance(devices, str) else devices) if str(i).strip()]
        return max(indices) + 1
    return int(devices)  # type: ignore[call-overload]


def check_devices(hardware: DictConfig) -> None:
    """Raise ValueError naming ``hardware.accelerator`` / ``hardware.devices`` when the GPUs asked for are not here.

    CPU devices are processes (DDP on CPU uses gloo), so they are not counted; under SLURM Lightning checks
    ``hardware.devices`` against the tasks per node itself.
    """
    if str(hardware.accelerator) not in GPU_ACCELERATORS:
        return
    available = torch.cuda.device_count()
    if available == 0:
        raise ValueError(
            f"hardware.accelerator={hardware.accelerator} asks for GPUs, but this machine has no CUDA GPU "
            "(torch.cuda.device_count() is 0). Use hardware=cpu, or add hardware.accelerator=cpu to run "
            "hardware=ddp as CPU processes (gloo)."
        )
    wanted = requested_gpus(hardware.devices, available)
    if wanted > available:
        raise ValueError(
            f"hardware.devices={hardware.devices} asks for {wanted} GPUs, but this machine has "
            f"{available}. Set hardware.devices={available} (or -1 for all of them)."
        )
