"""One-process validation of a checkpoint under a composed config (used by tests/test_ddp.py to compare a 2-process
evaluation with a 1-process one). ``python tests/validate_ckpt.py <ckpt> <overrides...>`` prints ``METRICS <json>``."""

from __future__ import annotations

import json
import sys

import lightning as L
from hydra import compose, initialize_config_dir

from mimlab.train import CONFIG_DIR, build


def main(ckpt: str, overrides: list[str]) -> None:
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    L.seed_everything(cfg.seed)
    datamodule, module, trainer = build(cfg)
    results = trainer.validate(module, datamodule=datamodule, ckpt_path=ckpt, verbose=False)
    print("METRICS " + json.dumps({k: float(v) for k, v in results[0].items()}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
