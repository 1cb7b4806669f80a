"""What a process of a multi-process run says when another one disappears (killed, out of memory, crashed): the
collective it waits in fails with the backend's words (gloo "Connection reset by peer", NCCL "remote process
exited"), which name neither the cause nor the way out."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from mimlab.checkpoints.auto_resume import resolve_ckpt_path

# what gloo, NCCL and the TCP store say when the other end of a connection is gone
_PEER_LOST = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Broken pipe",
    "remote process exited",
    "ncclRemoteError",
    "NCCL communicator was aborted",
)


class PeerProcessLostError(RuntimeError):
    """Another process of a multi-process run went away; the message says so and where to resume from."""


def peer_lost(err: BaseException, trainer: L.Trainer, output_dir: str | Path) -> PeerProcessLostError | None:
    """The error to raise instead of ``err`` when it says that a peer process of ``trainer``'s multi-process run
    disappeared: naming this rank, its step and the newest checkpoint under ``output_dir``; None otherwise."""
    if trainer.world_size < 2 or not any(text in str(err) for text in _PEER_LOST):
        return None
    newest = resolve_ckpt_path("last", output_dir)
    resume = f"resume with ckpt_path={newest}" if newest else "no checkpoint was written yet: start the run again"
    return PeerProcessLostError(
        f"another process of this {trainer.world_size}-process run stopped (killed, out of memory or crashed), so "
        f"rank {trainer.global_rank} lost its connection at step {trainer.global_step} ({type(err).__name__}: "
        f"{str(err).splitlines()[0][:200]}). Look in the other processes' logs for why; then {resume}."
    )
