"""User datasets as ImageFolder trees (``root/<class>/<image>``), preprocessed the backbone's way.

:func:`image_folder` returns a ``torchvision.datasets.ImageFolder`` whose transform is the model's
own timm data config (:func:`reweight.backbones.backbone_transform`); :func:`load_imagefolder`
materialises a small tree into a :class:`reweight.data.Dataset` (images ``(N, C, H, W)`` float32,
labels int64) so that the rest of CARROT (splits, corruption, features, staged training) can use it
exactly like the embedded datasets. Class indices follow ImageFolder's sorted folder names.

Reference: torchvision ``ImageFolder`` (https://pytorch.org/vision/stable/datasets.html).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional, Tuple

import numpy as np
import torch

from .data import Dataset
from .errors import DataError

__all__ = ["image_folder", "imagefolder_classes", "load_imagefolder"]

_EXTS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def imagefolder_classes(root: str | Path) -> List[str]:
    """Sorted class folder names of an ImageFolder tree.

    Raises:
        DataError: if ``root`` is not a directory or has fewer than 2 class folders holding images.
    """
    p = Path(root)
    if not p.is_dir():
        raise DataError(f"The 'root' parameter of image_folder must be an existing directory. Got {str(root)!r} instead.")
    classes = sorted(d.name for d in p.iterdir() if d.is_dir()
                     and any(f.suffix.lower() in _EXTS for f in d.rglob("*") if f.is_file()))
    if len(classes) < 2:
        raise DataError(f"Expected an ImageFolder tree root/<class>/<image> with at least 2 class folders holding "
                        f"images ({', '.join(_EXTS)}), but {str(root)!r} has {len(classes)}: {classes}.")
    return classes


def image_folder(root: str | Path, model: Optional[torch.nn.Module] = None, transform: Any = None,
                 is_training: bool = False, **data_overrides: Any):
    """A ``torchvision.datasets.ImageFolder`` of ``root`` with the backbone's preprocessing.

    Args:
        root: the tree ``root/<class>/<image>``.
        model: a timm model; its data config gives the transform (unless ``transform`` is given).
            A one-channel model gets grayscale images.
        transform: an explicit transform (overrides ``model``).
        is_training: use timm's training transform (augmentation) instead of the eval one.
        **data_overrides: overrides of the data config (``input_size``, ``mean``, ``std`` ...).

    Raises:
        DataError: for a missing or malformed tree (see :func:`imagefolder_classes`), or if neither
            ``model`` nor ``transform`` is given.
    """
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import default_loader

    imagefolder_classes(root)
    loader = default_loader
    if transform is None:
        if model is None:
            raise DataError("The 'model' parameter of image_folder must be a timm model when no 'transform' is given. "
                            "Got None instead.")
        from .backbones import _in_chans, backbone_transform

        transform = backbone_transform(model, is_training=is_training, **data_overrides)
        if _in_chans(model) == 1:
            def loader(path: str):  # noqa: E306 - grayscale for one-channel stems
                from PIL import Image

                with open(path, "rb") as f:
                    return Image.open(f).convert("L")
    return ImageFolder(str(root), transform=transform, loader=loader)


def load_imagefolder(root: str | Path, model: torch.nn.Module, normalize: bool = False,
                     **data_overrides: Any) -> Tuple[Dataset, List[str]]:
    """Load a (small) ImageFolder tree into memory as a :class:`~reweight.data.Dataset`.

    Images go through the model's eval transform (resize / center crop to its ``input_size``,
    override it for small images, e.g. ``input_size=(3, 32, 32)``). With ``normalize=False`` (the
    convention of the embedded datasets) pixel values stay in [0, 1]; with ``True`` the model's
    ``mean``/``std`` are applied.

    Returns:
        ``(dataset, class_names)``.

    Raises:
        DataError: for a malformed tree or an image that cannot be read.
    """
    overrides = dict(data_overrides)
    if not normalize:
        from .backbones import _in_chans

        c = _in_chans(model)
        overrides.setdefault("mean", (0.0,) * c)
        overrides.setdefault("std", (1.0,) * c)
    ds = image_folder(root, model=model, **overrides)
    xs, ys = [], []
    for i in range(len(ds)):
        try:
            x, y = ds[i]
        except Exception as e:  # noqa: BLE001 - unreadable/corrupted image
            raise DataError(f"Could not read image {ds.samples[i][0]!r}: {type(e).__name__}: {e}") from e
        xs.append(torch.as_tensor(x, dtype=torch.float32))
        ys.append(int(y))
    images = torch.stack(xs).numpy()
    labels = np.asarray(ys, dtype=np.int64)
    return (Dataset(name=f"imagefolder:{Path(root).name}", images=np.ascontiguousarray(images), labels=labels,
                    num_classes=len(ds.classes)), list(ds.classes))
