"""Checkpoint import (one loader for every task and backbone family) and export."""

from mimlab.checkpoints.files import read_state_dict
from mimlab.checkpoints.load import CheckpointMismatchError, load_pretrained, pretrained_parts

__all__ = ["CheckpointMismatchError", "load_pretrained", "pretrained_parts", "read_state_dict"]
