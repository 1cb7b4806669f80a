"""Step time and memory of ViTDet attention against global attention, same ViT, same input.

    python experiments/vitdet_attention/measure.py --size 640 --width 192 --heads 3 --depth 12     # CPU (small)
    python experiments/vitdet_attention/measure.py --size 1024 --width 768 --heads 12 --depth 12 --device cuda

Each variant runs in its own process (so peak memory is its own): the backbone's ``forward_features`` + a sum
backward on a batch of ``--batch`` images, ``--warmup`` untimed then ``--steps`` timed steps. Variants:

* ``global``: :class:`MaskedViT` as used for dense transfer without ViTDet (global attention in every block, cls token);
* ``vitdet``: :class:`ViTDetBackbone` with 14x14 windows, global blocks every ``depth/4`` (2, 5, 8, 11 for 12 blocks)
  and decomposed relative position;
* ``vitdet_no_relpos``: the same windows without the relative position bias.

Reported per variant: ms/step (median; on CPU the process's CPU time, which a shared machine does not inflate,
on CUDA wall time), activations saved for backward (MiB; every saved storage once, parameters
excluded, through ``torch.autograd.graph.saved_tensors_hooks``) and the peak tensor memory allocated during one step
with no gradients held (CUDA: ``max_memory_allocated``; CPU: the running sum of the profiler's memory events).
Writes ``results_<device>_<size>.{md,json}`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's mimlab, run from anywhere

import torch

from mimlab.models.backbones.vit import MaskedViT
from mimlab.models.backbones.vitdet import ViTDetBackbone

VARIANTS = ("global", "vitdet", "vitdet_no_relpos")
MIB = 2**20


def global_block_indices(depth: int) -> list[int]:
    """ViTDet's pattern: the last block of each quarter of the depth (2, 5, 8, 11 for 12 blocks)."""
    every = max(depth // 4, 1)
    return [i for i in range(depth) if i % every == every - 1]


def build(variant: str, args: argparse.Namespace) -> torch.nn.Module:
    vit = dict(
        img_size=args.size,
        patch_size=args.patch,
        embed_dim=args.width,
        depth=args.depth,
        num_heads=args.heads,
        learnable_pos_embed=True,
    )
    if variant == "global":
        return MaskedViT(**vit)
    return ViTDetBackbone(
        window_size=args.window, global_blocks=global_block_indices(args.depth), rel_pos=variant == "vitdet", **vit
    )


def _peak_cpu_tensor_mib(step) -> float:
    """Peak of the tensor memory allocated (and not yet freed) during ``step()``, from the profiler's memory events."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak / MIB


def measure_one(variant: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build(variant, args).to(device)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    params = {p.data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}  # storage address -> bytes: activations only, each storage once

    def pack(t: torch.Tensor):
        if t.data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def step() -> None:
        model.forward_features(images)[0].float().sum().backward()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()  # also the first warm-up step
    saved_mib = sum(saved.values()) / MIB
    for _ in range(args.warmup - 1):
        step()
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        peak = (torch.cuda.max_memory_allocated() - before) / MIB
    else:
        peak = _peak_cpu_tensor_mib(step)
    clock = time.perf_counter if device.type == "cuda" else time.process_time  # CPU: compute time, not queueing
    times = []
    for _ in range(args.steps):
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = clock()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(clock() - t0)
    return {
        "variant": variant,
        "ms_per_step": 1000 * statistics.median(times),
        "saved_activations_mib": saved_mib,
        "peak_step_memory_mib": peak,
        "tokens": (args.size // args.patch) ** 2,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=640)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--window", type=int, default=14)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--variant", choices=VARIANTS, help="measure one variant in this process and print its JSON")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = p.parse_args(argv)
    if args.variant:
        print(json.dumps(measure_one(args.variant, args)))
        return
    rows = []
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--variant", variant]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    setting = (
        f"ViT width {args.width}, {args.depth} blocks, {args.heads} heads, patch {args.patch}, {args.size} px "
        f"({rows[0]['tokens']} tokens), batch {args.batch}, {args.device}"
        f"{f' ({args.threads} threads)' if args.threads else ''}, fp32, forward_features + backward"
    )
    lines = [
        f"# ViTDet attention vs global attention\n\n{setting}; window {args.window}, global blocks "
        f"{global_block_indices(args.depth)}.\n",
        f"| variant | {'CPU ' if args.device == 'cpu' else ''}ms / step | activations saved for backward (MiB) "
        "| peak step memory (MiB) |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['variant']} | {r['ms_per_step']:.0f} | {r['saved_activations_mib']:.0f} | "
        f"{r['peak_step_memory_mib']:.0f} |"
        for r in rows
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"results_{args.device}_{args.size}"
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (args.out / f"{stem}.json").write_text(json.dumps({"setting": setting, "rows": rows}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
