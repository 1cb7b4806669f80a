"""The ``worker_init_fn`` of every mimlab DataLoader: workers leave SIGTERM and Ctrl-C to the main process."""

from __future__ import annotations

import os
import signal
import threading

from lightning.fabric.utilities.seed import pl_worker_init_function


def init_worker(worker_id: int) -> None:
    """Ignore SIGTERM and SIGINT in this DataLoader worker, then seed it as Lightning's ``seed_everything(workers=True)``
    does.

    SLURM signals every process of a job on preemption, ``scancel`` and ``scontrol requeue``. A torch worker dies on
    an outside SIGTERM, and the main process then fails with "DataLoader worker ... is killed by signal: Terminated"
    before it can write its preemption checkpoint (and submitit reports the requeued job as failed). Ignoring it
    here lets the main process alone handle the signal: Lightning stops after the batch, ``PreemptionCheckpoint``
    writes ``last.ckpt``, and the workers are shut down with the loader (or exit when their parent is gone). A
    terminal's Ctrl-C reaches the whole process group the same way; the main process turns it into that same stop.
    A SIGTERM from the main process itself still ends the worker (:func:`ignore_sigterm_unless_from_parent`).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ignore_sigterm_unless_from_parent()
    if os.environ.get("PL_SEED_WORKERS") == "1":  # what Lightning adds itself when no worker_init_fn is given
        pl_worker_init_function(worker_id)


def ignore_sigterm_unless_from_parent() -> None:
    """In a worker: SIGTERM ends it only when the main process sent it. The main process terminates its workers that
    way when a loader shuts down and when the program exits with a loader still being iterated (Python's exit handler
    terminates daemonic children and waits for them: ignoring its SIGTERM would hang the exit forever); a SIGTERM
    from anyone else (SLURM, ``scancel``, a shell) is consumed. The signal is blocked and taken by a thread that
    reads its sender (``sigwaitinfo``)."""
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait_for_parents_sigterm() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        os._exit(0)

    threading.Thread(target=wait_for_parents_sigterm, name="sigterm-from-parent", daemon=True).start()
