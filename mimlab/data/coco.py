"""COCO instance detection / segmentation: dataset, transforms and ``COCODataModule``.

Layout (standard COCO 2017)::

    <root>/annotations/instances_{train,val}2017.json
    <root>/train2017/*.jpg   <root>/val2017/*.jpg

A sample is ``(image, target)``: ``image`` a ``tv_tensors.Image`` (3, H, W) float in [0, 1] after the transforms,
``target`` a dict with ``boxes`` (K, 4) XYXY ``tv_tensors.BoundingBoxes`` in pixels, ``masks`` (K, H, W) uint8
``tv_tensors.Mask``, ``labels`` (K,) int64 contiguous labels 1..C (0 is background, as torchvision detectors expect),
``image_id`` (int) and, when crowd regions are kept, ``iscrowd`` (K,) and ``area`` (K,).
Polygons and RLE (compressed or uncompressed) are decoded with ``pycocotools.mask``.

Crowd handling follows the torchvision / Detectron2 references: crowd regions are dropped from *training*
targets (``keep_crowd=False``) and kept with ``iscrowd=1`` for *evaluation*, where COCO matching ignores them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from mimlab.data.base import ResumableDataModule
from mimlab.data.generated import check_generated_root
from mimlab.data.image_folder import load_rgb
from mimlab.data.synthetic_dense import COCO_OWN_DATA_HINT, write_coco
from mimlab.data.transforms import MEAN_PIXEL
from mimlab.utils.extras import require

_PYCOCOTOOLS_FEATURE = "COCO data (data=coco..., polygon and RLE masks)"


def read_rgb(path: str | Path) -> torch.Tensor:
    """Decode an image file to a (3, H, W) uint8 RGB tensor; ``CorruptImageError`` names an undecodable file."""
    return v2.functional.pil_to_tensor(load_rgb(path))


def annotation_file(root: str | Path, split: str) -> Path:
    """``<root>/annotations/instances_<split>2017.json``, with a clear error when it is missing."""
    path = Path(root) / "annotations" / f"instances_{split}2017.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"COCO annotation file not found: {path}. Expected the standard layout "
            f"<root>/annotations/instances_{{train,val}}2017.json; set data.root to the COCO folder "
            f"(or use data=coco_synthetic to write the embedded set)."
        )
    return path


def _read_instances(ann_path: Path) -> dict:
    """The parsed instances json; ``ValueError`` naming the file for broken JSON, missing lists or no annotations."""
    try:
        with open(ann_path) as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{ann_path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); is the file complete?"
        ) from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or key not in data:
            raise KeyError(f"{ann_path} has no '{key}' list; it is not a COCO instances file.")
    if not data["annotations"]:
        raise ValueError(
            f"{ann_path} has an empty 'annotations' list: nothing to train on or to score (box/mask mAP "
            "would be -1). Point data.root at the instances files of your data."
        )
    objects = [a for a in data["annotations"] if not a.get("iscrowd", 0) and _has_area(a)]
    if not objects:
        raise ValueError(
            f"{ann_path}: all {len(data['annotations'])} annotations are crowd regions (iscrowd=1) or empty boxes. "
            "Training drops crowd regions and COCO evaluation ignores them, so there is nothing to train on or to "
            "score (box/mask mAP would be -1). Use instances files with individual (iscrowd=0) objects."
        )
    return data


def _has_area(ann: dict) -> bool:
    """Whether the annotation's box ``[x, y, w, h]`` has a positive width and height (targets keep only those)."""
    box = ann.get("bbox") or [0, 0, 0, 0]
    return box[2] > 0 and box[3] > 0


def _check_segmentation(ann: dict, ann_path: Path) -> None:
    """``ValueError`` naming the annotation unless its segmentation is polygons (flat ``[x1, y1, x2, y2, ...]`` lists
    of at least 3 points) or RLE (``counts`` and ``size``)."""
    segm = ann.get("segmentation")
    where = f"{ann_path}: annotation {ann.get('id')} (image {ann.get('image_id')})"
    if isinstance(segm, dict):
        if not {"counts", "size"} <= segm.keys():
            raise ValueError(f"{where} has an RLE segmentation without 'counts' and 'size'.")
        return
    if not isinstance(segm, list) or not segm:
        raise ValueError(f"{where} has no segmentation: expected a list of polygons or an RLE dict.")
    for poly in segm:
        if (
            not isinstance(poly, list)
            or len(poly) < 6
            or len(poly) % 2
            or not all(isinstance(v, (int, float)) for v in poly)
        ):
            shown = poly[:8] if isinstance(poly, list) else poly
            raise ValueError(
                f"{where} has an invalid polygon {shown}: a polygon is a flat list [x1, y1, x2, y2, ...] "
                "of at least 3 points. Fix or remove the annotation."
            )


def _segmentation_to_mask(segm, height: int, width: int) -> np.ndarray:
    """Decode a COCO polygon list, uncompressed RLE (``counts`` a list) or compressed RLE to an (H, W) uint8 mask."""
    mask_utils = require("pycocotools.mask", _PYCOCOTOOLS_FEATURE)
    if isinstance(segm, list):  # polygons
        rles = mask_utils.frPyObjects(segm, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(segm.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segm, height, width)
    else:
        rle = segm
    return mask_utils.decode(rle).astype(np.uint8)


class COCOInstances(Dataset):
    """COCO images with boxes, masks and contiguous labels.

    Args:
        root: COCO folder (see module docstring).
        split: ``"train"`` or ``"val"``.
        transforms: a ``torchvision.transforms.v2`` callable ``(image, target) -> (image, target)``.
        keep_crowd: keep ``iscrowd=1`` annotations (for evaluation) or drop them (for training).
    """

    def __init__(
        self, root: str | Path, split: str = "train", transforms: Callable | None = None, keep_crowd: bool = False
    ):
        self.root = Path(root)
        self.split = split
        self.transforms = transforms
        self.keep_crowd = keep_crowd
        ann_path = self.ann_path = annotation_file(root, split)
        data = _read_instances(ann_path)
        self.image_dir = self.root / f"{split}2017"
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"COCO image folder not found: {self.image_dir} (listed by {ann_path}).")
        present = set(os.listdir(self.image_dir))
        missing = [im["file_name"] for im in data["images"] if im["file_name"] not in present]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} image(s) listed in {ann_path} are absent from {self.image_dir}: "
                f"{missing[:5]}{' ...' if len(missing) > 5 else ''}. Restore them or remove their entries from the json."
            )
        self.categories = sorted(data["categories"], key=lambda c: c["id"])
        self.cat_id_to_label = {c["id"]: i + 1 for i, c in enumerate(self.categories)}
        self.label_to_cat_id = {v: k for k, v in self.cat_id_to_label.items()}
        self.images = sorted(data["images"], key=lambda im: im["id"])
        self.anns_by_image: dict[int, list[dict]] = {im["id"]: [] for im in self.images}
        for ann in data["annotations"]:
            if ann["image_id"] not in self.anns_by_image:
                raise KeyError(f"{ann_path}: annotation {ann.get('id')} refers to unknown image_id {ann['image_id']}.")
            if ann["category_id"] not in self.cat_id_to_label:
                raise KeyError(f"{ann_path}: annotation {ann.get('id')} has unknown category_id {ann['category_id']}.")
            _check_segmentation(ann, ann_path)
            self.anns_by_image[ann["image_id"]].append(ann)

    @property
    def num_classes(self) -> int:
        """Number of object classes (background excluded)."""
        return len(self.categories)

    def __len__(self) -> int:
        return len(self.images)

    def load_target(self, index: int) -> dict:
        """Target of image ``index`` before transforms (see module docstring)."""
        info = self.images[index]
        h, w = info["height"], info["width"]
        anns = [a for a in self.anns_by_image[info["id"]] if self.keep_crowd or not a.get("iscrowd", 0)]
        anns = [a for a in anns if _has_area(a)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        masks = (
            np.stack([_segmentation_to_mask(a["segmentation"], h, w) for a in anns])
            if anns
            else np.zeros((0, h, w), np.uint8)
        )
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
            "masks": tv_tensors.Mask(torch.from_numpy(masks)),
            "labels": torch.tensor([self.cat_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
            "image_id": info["id"],
        }
        if self.keep_crowd:
            target["iscrowd"] = torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64)
            target["area"] = torch.tensor([float(a["area"]) for a in anns], dtype=torch.float32)
        return target

    def __getitem__(self, index: int):
        info = self.images[index]
        path = self.image_dir / info["file_name"]
        image = tv_tensors.Image(read_rgb(path))
        if tuple(image.shape[-2:]) != (info["height"], info["width"]):
            raise ValueError(
                f"{self.ann_path}: image {info['id']} ({path}) is {image.shape[-1]}x{image.shape[-2]} pixels but the "
                f"json gives width {info['width']}, height {info['height']}, the size its boxes and masks are drawn "
                "in. Fix the image's width/height in the json, or restore the image file it describes."
            )
        target = self.load_target(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def _labels_and_coco_fields(inputs):
    target = inputs[1]
    return tuple(target[k] for k in ("labels", "iscrowd", "area") if k in target)


class FixedSizeCrop(v2.Transform):
    """Detectron2's ``FixedSizeCrop``: a random crop of at most ``size``² (where the image is larger), then padding at
    the bottom/right to ``size``² — image at the top-left, as the detector's evaluation padding places it. Images are
    padded with ``fill`` (the mean pixel, which the detector's normalisation turns into the 0 its evaluation padding
    has, as Detectron2 pads normalised images with 0), masks with 0; boxes keep their coordinates."""

    def __init__(self, size: int, fill: Sequence[int] = MEAN_PIXEL):
        super().__init__()
        self.size, self.fill = size, list(fill)

    def make_params(self, flat_inputs: list) -> dict:
        image = next(x for x in flat_inputs if isinstance(x, tv_tensors.Image))
        h, w = v2.functional.get_size(image)
        ch, cw = min(h, self.size), min(w, self.size)
        top = int(torch.randint(0, h - ch + 1, ()))
        left = int(torch.randint(0, w - cw + 1, ()))
        return dict(top=top, left=left, height=ch, width=cw)

    def transform(self, inpt, params: dict):
        if not isinstance(inpt, (tv_tensors.Image, tv_tensors.Mask, tv_tensors.BoundingBoxes)):
            return inpt
        out = v2.functional.crop(inpt, params["top"], params["left"], params["height"], params["width"])
        padding = [0, 0, self.size - params["width"], self.size - params["height"]]
        return v2.functional.pad(out, padding, fill=self.fill if isinstance(inpt, tv_tensors.Image) else 0)


def lsj_transforms(size: int = 1024, scale_range: Sequence[float] = (0.1, 2.0), train: bool = True) -> v2.Compose:
    """Large-scale jitter as ViTDet's Detectron2 recipe: flip, rescale by U(scale_range) of ``size``
    (``ResizeScale``), :class:`FixedSizeCrop` to size² (image top-left, mean-pixel padding).

    Eval: only converts to float; the detector resizes the longer side to ``size`` and pads the batch to size²
    (``task.adapter.input_size``) with the same mean-pixel value, so evaluation inputs look like training canvases.
    """
    if not train:
        return v2.Compose([v2.ToDtype(torch.float32, scale=True)])
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(),
            v2.ScaleJitter(target_size=(size, size), scale_range=tuple(scale_range), antialias=True),
            FixedSizeCrop(size),
            v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(labels_getter=_labels_and_coco_fields),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


def multiscale_transforms(
    size: int = 800, max_size: int = 1333, min_scale: float = 0.6, num_scales: int = 11, train: bool = True
) -> v2.Compose:
    """Multi-scale training + flip, as in the 1× recipes: the shorter side is drawn from ``num_scales`` evenly spaced
    sizes from ``min_scale·size`` to ``size`` (480, 512, ..., 800 at 800), the longer side is capped at ``max_size``.

    Eval: only converts to float; the detector resizes (shorter side ``size``, longer ≤ ``max_size``)."""
    if not train:
        return v2.Compose([v2.ToDtype(torch.float32, scale=True)])
    min_sizes = [round(size * (min_scale + (1 - min_scale) * i / max(num_scales - 1, 1))) for i in range(num_scales)]
    return v2.Compose(
        [
            v2.RandomShortestSize(min_size=min_sizes, max_size=max_size, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(labels_getter=_labels_and_coco_fields),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


def detection_collate(batch):
    """List of ``(image, target)`` → ``(list[image], list[target])`` (detectors take variable-size lists)."""
    images, targets = zip(*batch)
    return list(images), list(targets)


class COCODataModule(ResumableDataModule):
    """COCO train/val loaders for instance detection/segmentation (sharding, seeding, resume: the base class).

    Args:
        root: COCO folder. With ``generate_if_missing`` it is the folder of the embedded synthetic COCO-format set,
            generated there first if absent (:mod:`mimlab.data.synthetic_dense`); any other folder is then refused.
        img_size, max_size: the run's input size (the one size knob: the recipes build the transforms, the detector's
            evaluation size and the backbone's position-embedding grid from it) and the longer-side cap at evaluation;
            the default transforms (LSJ at ``img_size``) use them.
        train_transforms / val_transforms: v2 pipelines (e.g. :func:`lsj_transforms`), built by Hydra.
        num_classes: expected category count (checked against the json at ``setup``; the task reads it from config).
        Others: see :class:`~mimlab.data.base.ResumableDataModule` (``val_batch_size`` defaults to ``batch_size``).
    """

    train_collate = val_collate = staticmethod(detection_collate)

    def __init__(
        self,
        root: str,
        img_size: int = 1024,
        max_size: int | None = None,
        batch_size: int = 2,
        train_transforms: Callable | None = None,
        val_transforms: Callable | None = None,
        generate_if_missing: bool = False,
        synthetic_size: int = 64,
        num_classes: int | None = None,
        val_split: str = "val",
        **kwargs,
    ):
        require("pycocotools.mask", _PYCOCOTOOLS_FEATURE)  # before any data is read
        super().__init__(root, batch_size=batch_size, **kwargs)
        self.expected_num_classes = num_classes
        self.img_size, self.max_size = img_size, max_size or img_size
        self.train_transforms = train_transforms if train_transforms is not None else lsj_transforms(img_size)
        self.val_transforms = val_transforms if val_transforms is not None else lsj_transforms(img_size, train=False)
        self.generate_if_missing, self.synthetic_size = generate_if_missing, synthetic_size
        self.val_split = val_split
        if generate_if_missing:  # root must be absent, empty or a set mimlab generated: never a user's folder
            check_generated_root(self.root, "coco", COCO_OWN_DATA_HINT)

    def prepare_data(self) -> None:
        if self.generate_if_missing:
            write_coco(self.root, size=self.synthetic_size)

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()  # idempotent; makes the module usable without a Trainer
        super().setup(stage)

    def build_datasets(self) -> tuple[COCOInstances, COCOInstances]:
        train = COCOInstances(self.root, "train", self.train_transforms, keep_crowd=False)
        val = COCOInstances(self.root, self.val_split, self.val_transforms, keep_crowd=True)
        n = train.num_classes
        if self.expected_num_classes is not None and n != self.expected_num_classes:
            raise ValueError(
                f"data.num_classes={self.expected_num_classes} but {self.root} has {n} categories; "
                f"set data.num_classes={n} (the detector's class count follows it)."
            )
        if val.cat_id_to_label != train.cat_id_to_label:
            only_train = sorted(set(train.cat_id_to_label) - set(val.cat_id_to_label))
            only_val = sorted(set(val.cat_id_to_label) - set(train.cat_id_to_label))
            raise ValueError(
                f"{annotation_file(self.root, 'val')} and {annotation_file(self.root, 'train')} list "
                f"different categories (only in train: {only_train}, only in val: {only_val}); labels "
                "follow the category ids, so both files need the same 'categories' list."
            )
        return train, val

    @property
    def num_classes(self) -> int:
        self.setup()
        return self.train_set.num_classes  # type: ignore[union-attr]

    def data_identity(self) -> tuple[str, Iterable[str]]:
        def lines():
            for dataset in (self.train_set, self.val_set):
                yield from (f"{c['id']} {c['name']}" for c in dataset.categories)
                yield from (
                    f"{im['id']} {im['file_name']} {len(dataset.anns_by_image[im['id']])}" for im in dataset.images
                )

        return f"{len(self.train_set)} train + {len(self.val_set)} val images", lines()  # type: ignore[arg-type]
