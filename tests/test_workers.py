"""DataLoader workers leave SIGTERM from others (SLURM, a shell) to the main process, yet end when the main process
terminates them, so a program that stops iterating a loader with workers exits instead of waiting forever."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

SCRIPT = textwrap.dedent(
    """
    import os, sys, time, torch
    from torch.utils.data import DataLoader, Dataset
    from mimlab.data.workers import init_worker

    class Pids(Dataset):
        def __len__(self):
            return 1000
        def __getitem__(self, i):
            return os.getpid()

    it = iter(DataLoader(Pids(), batch_size=2, num_workers=2, worker_init_fn=init_worker))
    print(" ".join(str(int(next(it)[0])) for _ in range(4)), flush=True)
    if sys.argv[1] == "wait":
        time.sleep(float(sys.argv[2]))
        print("alive", sorted(p.pid for p in __import__("multiprocessing").active_children() if p.is_alive()), flush=True)
    print("exiting", flush=True)  # the iterator is still alive: Python's exit handler must stop its workers
    """
)


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_a_program_that_stops_iterating_a_loader_with_workers_exits():
    proc = start("exit")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "exiting" in out, err[-2000:]


def test_a_sigterm_from_another_process_does_not_end_a_worker():
    proc = start("wait", "4")
    workers = {int(pid) for pid in proc.stdout.readline().split()}  # type: ignore[union-attr]
    assert len(workers) == 2 and proc.pid not in workers
    for pid in workers:
        os.kill(pid, signal.SIGTERM)  # this test process is not the workers' parent
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert f"alive {sorted(workers)}" in out  # both workers outlived the outside SIGTERM
    time.sleep(0.5)
    for pid in workers:  # and were ended at exit
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
