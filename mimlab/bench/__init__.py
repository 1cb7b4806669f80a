"""Throughput benchmark: ``python -m mimlab.bench model=mae_vit_b batch=256 steps=15`` (``make bench``).

For each workload of ``conf/bench.yaml`` (a recipe: the real pre-training or fine-tuning task) it reports images/s
(median over ``repeats`` timed windows, with their spread), ms/step, peak GPU memory, train FLOPs per image
(:mod:`mimlab.utils.flops`, the count the dashboard's ``perf/mfu`` uses) and MFU against ``peak_tflops``, for every
combination of {eager, compiled} x {plain PyTorch loop, Lightning Trainer} on synthetic batches already on the device;
with ``data_root`` also the real data path alone, the model fed by it, and our train loader side by side with the
official MAE loader (torchvision ``ImageFolder`` + its transforms). Everything goes into a JSON.

Modules: :mod:`~mimlab.bench.workloads` (what is timed), :mod:`~mimlab.bench.timing` (the loops and their clocks),
:mod:`~mimlab.bench.datapath` (loader side by side), :mod:`~mimlab.bench.cli` (arguments, driver, table).
Batches are what the real loader delivers (:func:`~mimlab.bench.workloads.loader_batch`): ``(images (N, 3, S, S), labels
(N,))`` and, for pre-training, the masks its workers draw (a ``MaskSet``, 1 = masked); the host time of those masks is
reported per batch (:func:`~mimlab.bench.workloads.mask_timing`).
"""

from mimlab.bench.cli import load_config, main, run
from mimlab.bench.workloads import ExperimentWorkload, loader_batch, quiet_step

__all__ = ["ExperimentWorkload", "load_config", "loader_batch", "main", "quiet_step", "run"]
