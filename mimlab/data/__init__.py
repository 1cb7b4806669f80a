"""LightningDataModules, datasets and transforms (import submodules directly, e.g. ``mimlab.data.imagenet``)."""
