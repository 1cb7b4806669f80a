"""Checkpoint import / export."""
from mimlab.checkpoints.load import CheckpointMismatchError, load_pretrained, read_state_dict

__all__ = ["CheckpointMismatchError", "load_pretrained", "read_state_dict"]
