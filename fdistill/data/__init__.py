"""Datasets for real data.

Images (ImageNet-64 and friends): `open_image_dataset(path)` reads an EDM dataset zip in place, a folder of
class sub-folders, or an npz; items are (CHW float in [-1, 1], class index or -1); `one_hot` makes EDM-style
label vectors.
"""

from .images import (FolderImageDataset, ImageDataset, NpzImageDataset, ZipImageDataset, infinite_batches,
                     make_image_loader, one_hot, open_image_dataset)

__all__ = ["ImageDataset", "ZipImageDataset", "FolderImageDataset", "NpzImageDataset", "open_image_dataset",
           "one_hot", "make_image_loader", "infinite_batches"]
