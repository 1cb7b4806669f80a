"""mimlab: masked image modeling pre-training and transfer on Lightning + Hydra."""
