"""Pre-training throughput (img/s) of composed experiments on one device: forward + backward + AdamW step.

Builds each experiment's task module exactly as ``mimlab.train`` would (Hydra compose + instantiate), then times
``--steps`` training steps after ``--warmup`` steps on random images, bf16 autocast and ``torch.compile`` by default.
Goal for issue 5: iTPN-B pixel >= 0.8x MAE-B on the same machine.

    python experiments/itpn_throughput/bench.py --experiments itpn_base_pixel mae_vit_b --batch 128
    python experiments/itpn_throughput/bench.py --experiments itpn_hivit_tiny_synthetic mae_vit_tiny_synthetic \
        --device cpu --batch 8 --steps 2 --warmup 1 --no-compile --dtype float32      # smoke test
"""
from __future__ import annotations

import argparse
import time

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from mimlab.train import CONFIG_DIR


def build(experiment: str):
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", "logger=none", "paths.output_dir=/tmp/bench"])
    return instantiate(cfg.method), int(cfg.data.img_size)


def bench(experiment: str, args) -> float:
    module, img_size = build(experiment)
    device = torch.device(args.device)
    module = module.to(device).train()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    fwd = torch.compile(module) if args.compile else module
    dtype = getattr(torch, args.dtype)
    images = torch.randn(args.batch, 3, img_size, img_size, device=device)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        mask = module.make_mask(images, gen)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            pred, target = fwd(images, mask)
            loss = module.loss(pred, target, mask)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        module.target.update(module.backbone, 0.5)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args.batch * args.steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", nargs="+", default=["itpn_base_pixel", "mae_vit_b"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    results = {e: bench(e, args) for e in args.experiments}
    name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"device: {name}  batch {args.batch}  dtype {args.dtype}  compile {args.compile}")
    for e, v in results.items():
        print(f"{e:40s} {v:10.1f} img/s")
    if len(results) == 2:
        a, b = results.values()
        print(f"ratio {args.experiments[0]} / {args.experiments[1]}: {a / b:.3f}")


if __name__ == "__main__":
    main()
