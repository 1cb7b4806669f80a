"""Exact resume through ``python -m mimlab.train``: a run killed (SIGKILL: crash, SIGTERM: preemption) mid-epoch or at an
epoch boundary and resumed from its ``last.ckpt`` ends with the weights of an uninterrupted run, for every DataModule,
with 0 and 2 (persistent) loader workers. The uninterrupted reference runs with 0 workers, so a match also shows that
the worker count does not change the data."""

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_VIT, compose_config
from mimlab.checkpoints.compat import ConfigMismatchError, check_resume_config
from mimlab.data.shards import write_shards
from mimlab.data.synthetic_dense import write_ade20k, write_coco
from mimlab.utils.wandb_offline import summarise_run

REPO = Path(__file__).resolve().parents[1]
COMMON = [
    "logger=csv",
    "~callbacks.progress",
    "trainer.max_epochs=2",
    "callbacks.checkpoint.monitor=null",
    "callbacks.checkpoint.save_top_k=0",
]
MAE = [
    "experiment=mae_vit_tiny_synthetic",
    "data.img_size=32",
    "data.batch_size=8",
    "model.backbone.embed_dim=32",
    "model.backbone.depth=2",
    "model.backbone.num_heads=2",  # 2 blocks: drop path draws from the global RNG
    "model.decoder.embed_dim=16",
    "model.decoder.num_heads=2",
    "model.backbone.drop_path_rate=0.1",
    "optim.warmup_epochs=1",
    "~callbacks.reconstruction",
    "~callbacks.knn",
]
DENSE = [
    *TINY_VIT,
    "model.neck.out_channels=16",
    "data.batch_size=4",
    "data.generate_if_missing=false",
    "optim.schedule.warmup_steps=4",
    "trainer.limit_val_batches=0",
]
DETECT = [
    "experiment=detect_mae_vit_tiny_synthetic",
    *DENSE,
    "task.head_channels=16",
    "task.representation_size=32",
    "task.box_batch_size_per_image=32",
    "task.rpn_pre_nms_top_n=50",
    "task.rpn_post_nms_top_n=20",
]
SEGMENT = [
    "experiment=segment_mae_vit_tiny_synthetic",
    *DENSE,
    "task.decode_head.channels=16",
    "task.aux_head.channels=8",
]


@pytest.fixture(scope="module")
def data(synthetic_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("resume_data")
    for split in ("train", "val"):
        write_shards(synthetic_root, base / "shards", split, shard_size=16)
    write_coco(base / "coco", num_train=24, num_val=4)
    write_ade20k(base / "ade", num_train=24, num_val=4)
    return {
        "imagenet": [*MAE, f"data.root={synthetic_root}"],  # 60 images / 8: 7 steps per epoch
        "shards": [*MAE, "data=imagenet_shards", f"data.root={base / 'shards'}"],
        "coco": [*DETECT, f"data.root={base / 'coco'}"],  # 24 images / 4: 6 steps per epoch
        "ade": [*SEGMENT, f"data.root={base / 'ade'}"],
    }


def train(
    args: list[str], run_dir: Path, workers: int, kill: tuple[str, int] | None = None
) -> subprocess.CompletedProcess:
    extra = [
        f"hardware.num_workers={workers}",
        "hardware.persistent_workers=true",
        f"hydra.run.dir={run_dir}",
        "callbacks.checkpoint.every_n_train_steps=3",  # checkpoints/last.ckpt every 3 steps
        "+callbacks.epoch_end._target_=lightning.pytorch.callbacks.ModelCheckpoint",  # epoch_end/last.ckpt
        f"+callbacks.epoch_end.dirpath={run_dir / 'epoch_end'}",
        "+callbacks.epoch_end.save_last=true",
        "+callbacks.epoch_end.save_top_k=-1",
    ]  # (Lightning writes last only beside a kept one)
    if kill:
        extra += [
            "+callbacks.kill._target_=mimlab.callbacks.fault_injection.KillAtStep",
            f"+callbacks.kill.signal_name={kill[0]}",
            f"+callbacks.kill.step={kill[1]}",
        ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "disabled",
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    return subprocess.run(
        [sys.executable, "-m", "mimlab.train", *args, *COMMON, *extra],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=REPO,
    )


def checkpoint(run_dir: Path, folder: str = "epoch_end") -> dict:
    return torch.load(run_dir / folder / "last.ckpt", map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def references(data, tmp_path_factory):
    """Uninterrupted runs (0 workers), one per DataModule, made on first use."""
    made: dict[str, dict] = {}

    def get(kind: str) -> dict:
        if kind not in made:
            run_dir = tmp_path_factory.mktemp(f"reference_{kind}")
            proc = train(data[kind], run_dir, workers=0)
            assert proc.returncode == 0, proc.stderr[-3000:]
            made[kind] = checkpoint(run_dir)
        return made[kind]

    return get


# (DataModule, workers, signal, kill at step, checkpoint folder resumed from, its step, steps per epoch)
CASES = [
    ("imagenet", 0, "SIGKILL", 5, "checkpoints", 3, 7),  # crash mid-epoch 0 -> periodic last.ckpt at step 3
    ("imagenet", 2, "SIGKILL", 11, "checkpoints", 9, 7),  # crash mid-epoch 1, 2 persistent workers
    ("imagenet", 2, "SIGTERM", 10, "checkpoints", 10, 7),  # preempted mid-epoch 1, 2 workers
    ("imagenet", 2, "SIGKILL", 8, "epoch_end", 7, 7),  # crash after epoch 0 -> its epoch-end checkpoint (boundary)
    ("imagenet", 0, "SIGTERM", 7, "checkpoints", 7, 7),  # preempted on the last batch of epoch 0 (boundary)
    ("shards", 2, "SIGKILL", 11, "checkpoints", 9, 7),
    ("coco", 2, "SIGTERM", 8, "checkpoints", 8, 6),
    ("ade", 2, "SIGKILL", 5, "checkpoints", 3, 6),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "workers", "sig", "kill_step", "folder", "ckpt_step", "per_epoch"),
    CASES,
    ids=[f"{c[0]}-w{c[1]}-{c[2]}-step{c[3]}" for c in CASES],
)
def test_killed_run_resumes_to_the_uninterrupted_weights(
    kind, workers, sig, kill_step, folder, ckpt_step, per_epoch, data, references, tmp_path
):
    reference = references(kind)
    assert reference["global_step"] == 2 * per_epoch
    crashed = train(data[kind], tmp_path / "killed", workers, kill=(sig, kill_step))
    assert crashed.returncode == (-signal.SIGKILL if sig == "SIGKILL" else 128 + signal.SIGTERM), crashed.stderr[-3000:]
    saved = checkpoint(tmp_path / "killed", folder)
    assert saved["global_step"] == ckpt_step
    assert not list((tmp_path / "killed" / "checkpoints").glob(".*tmp*"))  # no partial files left behind

    resumed = train(
        [*data[kind], f"ckpt_path={tmp_path / 'killed' / folder / 'last.ckpt'}"], tmp_path / "resumed", workers
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = checkpoint(tmp_path / "resumed")
    assert final["global_step"] == 2 * per_epoch
    a, b = reference["state_dict"], final["state_dict"]
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    print(
        f"{kind} workers={workers} {sig} at step {kill_step} (resumed from step {ckpt_step}): "
        f"{len(a) - len(different)}/{len(a)} tensors bit-identical"
    )
    assert not different, different


def test_resume_with_a_different_model_config_lists_the_keys(tmp_path):
    cfg = compose_config(["experiment=mae_vit_tiny_synthetic"], tmp_path)
    from omegaconf import OmegaConf

    saved = OmegaConf.to_container(cfg, resolve=True)
    path = tmp_path / "x.ckpt"
    torch.save({"mimlab": {"config": saved}}, path)
    changed = OmegaConf.to_container(
        compose_config(["experiment=mae_vit_tiny_synthetic", "masking.ratio=0.6", "model.decoder.depth=2"], tmp_path),
        resolve=True,
    )
    with pytest.raises(
        ConfigMismatchError, match=r"(?s)masking\.ratio: 0\.75 -> 0\.6.*allow_config_change=true"
    ) as err:
        check_resume_config(path, changed)
    assert "model.decoder.depth: 1 -> 2" in str(err.value)
    assert len(check_resume_config(path, changed, allow_change=True)) == 2
    assert check_resume_config(path, saved) == []


def metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_sigterm_then_resume_in_its_folder_continues_the_csv_and_the_wandb_run(synthetic_root, tmp_path):
    """Preempted at step 10 of 14 (mid-epoch 1), resumed in its own folder, then resumed once more after it finished:
    metrics.csv keeps every row logged before the preemption and gets each later step once; wandb (offline, the
    default) continues the same run id."""
    run_dir = tmp_path / "run"
    args = [*MAE, f"data.root={synthetic_root}", "logger=wandb", "trainer.log_every_n_steps=1"]
    args += [a for a in COMMON if a != "logger=csv"] + [f"hydra.run.dir={run_dir}"]
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")

    def cli(*extra: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "mimlab.train", *args, *extra]
        return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)

    kill = ["+callbacks.kill._target_=mimlab.callbacks.fault_injection.KillAtStep", "+callbacks.kill.step=10"]
    preempted = cli(*kill, "+callbacks.kill.signal_name=SIGTERM")
    assert preempted.returncode == 128 + signal.SIGTERM, preempted.stderr[-3000:]
    before = metrics_rows(run_dir)
    assert {int(r["step"]) for r in before} == set(range(10)) and any(r["val/loss"] for r in before)  # epoch 0's

    last = run_dir / "checkpoints" / "last.ckpt"
    resumed = cli(f"ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = metrics_rows(run_dir)
    assert after[: len(before)] == [{**row, **{k: "" for k in after[0].keys() - row.keys()}} for row in before]
    steps = [int(r["step"]) for r in after[len(before) :] if r["train/loss_step"]]
    assert steps == list(range(10, 14))  # each later step once
    assert [r["epoch"] for r in after if r["val/loss"]] == ["0", "1"]

    finished = cli(f"ckpt_path={last}")  # what the refusal of a finished run's folder suggests
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert metrics_rows(run_dir) == after

    runs = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 3 and len({p.name for p in runs}) == 1  # one wandb run id, continued twice
    assert summarise_run(runs[0])["history_rows"] > 0 and summarise_run(runs[1])["history_rows"] > 0


def test_the_csv_logger_keeps_a_runs_rows_and_drops_only_those_logged_again(tmp_path):
    from mimlab.loggers import HistoryCSVLogger

    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text("epoch,step,train/loss\n0,0,1.0\n0,1,0.9\n0,2,0.8\n")
    logger = HistoryCSVLogger(tmp_path, name="csv", version="")
    logger.rewind(2)  # training restarts at step 2
    logger.log_metrics({"train/loss": 0.7, "val/loss": 0.75}, step=2)
    logger.save()
    assert metrics_rows(tmp_path) == [
        {"epoch": "0", "step": "0", "train/loss": "1.0", "val/loss": ""},
        {"epoch": "0", "step": "1", "train/loss": "0.9", "val/loss": ""},
        {"epoch": "", "step": "2", "train/loss": "0.7", "val/loss": "0.75"},
    ]
