"""Image datasets for real data (ImageNet-64 and the like): EDM dataset zips, image folders, npz arrays.

Every dataset yields `(image, label)`: `image` a float32 CHW tensor in [-1, 1], `label` an int class index,
or -1 when the dataset has no labels. `one_hot` turns labels into EDM-style conditioning vectors (a zero
vector for -1). `open_image_dataset` picks the reader from the path:

- `*.zip`: EDM's dataset zip (`dataset_tool.py` output): image files plus an optional `dataset.json`
  `{"labels": [[filename, class], ...]}` (or `"labels": null`). Images are read from the archive on demand,
  never extracted; each process (DataLoader worker) opens its own handle.
- a folder: with `dataset.json`, the same layout unpacked; otherwise one sub-folder per class (class
  indices from sorted folder names, or the names themselves when they are all integers), or a flat folder
  of unlabeled images.
- `*.npz` / `*.npy`: uint8 images under `x` / `images` / `data` / `arr_0` (NHWC, NCHW, or rows of flattened
  CHW pixels), labels under `y` / `labels` (indices or one-hot rows). Uncompressed members are memory-mapped.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import zipfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import PIL.Image
import torch
from torch.utils.data import DataLoader, Dataset

from ..utils import IMAGE_EXTENSIONS, is_image_file

__all__ = [
    "IMAGE_EXTENSIONS", "ImageDataset", "ZipImageDataset", "FolderImageDataset", "NpzImageDataset",
    "open_image_dataset", "one_hot", "make_image_loader", "infinite_batches",
]

_IMAGE_KEYS = ("x", "images", "data", "arr_0")
_LABEL_KEYS = ("y", "labels")


_is_image = is_image_file


_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def _to_channels(a: np.ndarray, channels: int, name: str) -> np.ndarray:
    """An HxWxC uint8 image as ``channels`` channels, by one policy for every reader: only conversions that lose
    nothing. Gray becomes RGB by repetition; an alpha channel is dropped; colour is refused for a one-channel
    consumer unless its channels are equal (a gray image stored as RGB)."""
    c = a.shape[2]
    if c == channels:
        return a
    if c in (2, 4):  # gray + alpha, RGB + alpha
        return _to_channels(a[:, :, : c - 1], channels, name)
    if c == 1 and channels == 3:
        return np.repeat(a, 3, axis=2)
    if c == 3 and channels == 1:
        if (a[:, :, :1] == a[:, :, 1:]).all():
            return a[:, :, :1]
        raise ValueError(f"{name} is a colour image but the teacher takes 1 channel; convert the data to grayscale "
                         "first (e.g. PIL's Image.convert('L')): fdistill does not throw colour away silently")
    raise ValueError(f"{name} has {c} channels; {channels} expected")


def one_hot(labels, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Class indices (N,) -> (N, num_classes) one-hot rows; -1 (no label) gives an all-zero row."""
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if ((labels < -1) | (labels >= num_classes)).any():
        bad = labels[(labels < -1) | (labels >= num_classes)][0].item()
        raise ValueError(f"label {bad} is outside [0, {num_classes}) (use -1 for 'no label')")
    out = torch.zeros(labels.shape[0], num_classes, dtype=dtype, device=labels.device)
    keep = labels >= 0
    out[keep.nonzero(as_tuple=True)[0], labels[keep]] = 1
    return out


class ImageDataset(Dataset):
    """Shared behaviour: labels, resolution checks, conversion to [-1, 1] tensors, optional x-flip."""

    def __init__(self, path, labels: np.ndarray | None, *, resolution: int | None, num_classes: int | None,
                 channels: int, xflip: bool):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.path = str(path)
        self.channels = channels
        self.xflip = bool(xflip)
        n = len(self)
        if n == 0:
            raise ValueError(f"{self.path}: no images found; expected {self._layout_hint()}")
        if labels is None:
            self.labels = np.full(n, -1, dtype=np.int64)
            self.has_labels = False
            self.num_classes = num_classes
        else:
            self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
            if self.labels.shape[0] != n:
                raise ValueError(f"{self.path}: {self.labels.shape[0]} labels for {n} images")
            self.has_labels = True
            self.num_classes = int(num_classes) if num_classes is not None else int(self.labels.max()) + 1
            bad = np.flatnonzero((self.labels < 0) | (self.labels >= self.num_classes))
            if bad.size:
                i = int(bad[0])
                raise ValueError(
                    f"{self.path}: label {int(self.labels[i])} of {self._item_name(i)} is outside "
                    f"[0, {self.num_classes}) ({bad.size} such labels); check the labels (0-based class indices) "
                    "or num_classes")
        h, w = self._raw(0).shape[:2]
        self.resolution = h
        if h != w:
            raise ValueError(f"{self.path}: {self._item_name(0)} is {w}x{h}; square images are expected")
        if resolution is not None and h != resolution:
            raise ValueError(f"{self.path}: images are {h}x{h} but resolution {resolution} was asked for; "
                             f"resize the dataset first (e.g. EDM's dataset_tool.py --resolution="
                             f"{resolution}x{resolution})")

    # subclasses provide: __len__, _raw(i) -> uint8 HWC array, _item_name(i), _layout_hint()

    def __getitem__(self, idx: int):
        img = self._raw(idx)
        if img.shape[0] != self.resolution or img.shape[1] != self.resolution:
            raise ValueError(f"{self.path}: {self._item_name(idx)} is {img.shape[1]}x{img.shape[0]}, the dataset "
                             f"is {self.resolution}x{self.resolution}")
        # a fresh float32 array: memory-mapped sources are read-only, torch wants writable memory
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32))
        x = x / 127.5 - 1.0
        if self.xflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, int(self.labels[idx])

    def _decode(self, data: bytes, name: str) -> np.ndarray:
        try:
            with PIL.Image.open(io.BytesIO(data)) as im:
                im = im.convert("L" if im.mode in _GRAY_MODES else "RGB")
                arr = np.asarray(im, dtype=np.uint8)
        except Exception as e:  # PIL raises several types for broken files
            raise ValueError(f"{self.path}: {name} is not a readable image ({type(e).__name__}: {e})") from None
        return _to_channels(arr[:, :, None] if arr.ndim == 2 else arr, self.channels, f"{self.path}: {name}")

    def _item_name(self, i: int) -> str:
        return f"item {i}"

    def _layout_hint(self) -> str:
        return "image files"


def _labels_from_json(path: str, data: bytes, fnames: Sequence[str]) -> np.ndarray | None:
    try:
        meta = json.loads(data)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: dataset.json is not valid JSON: {e}") from e
    labels = meta.get("labels") if isinstance(meta, dict) else None
    if labels is None:
        return None
    table = {}
    for entry in labels:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2):
            raise ValueError(f"{path}: dataset.json labels must be [filename, class] pairs, got {entry!r}")
        name, lab = entry
        if isinstance(lab, bool) or not isinstance(lab, (int, np.integer)):
            raise ValueError(f"{path}: dataset.json label {lab!r} of {name} is not an integer class index "
                             "(vector labels are not supported)")
        table[str(name).replace("\\", "/")] = int(lab)
    present = set(fnames)
    missing = sorted(set(table) - present)
    if missing:
        raise ValueError(f"{path}: dataset.json lists {len(missing)} files that are not in the dataset, e.g. "
                         f"{missing[:3]}; the archive is incomplete or dataset.json belongs to another dataset")
    unlabeled = [f for f in fnames if f not in table]
    if unlabeled:
        raise ValueError(f"{path}: {len(unlabeled)} images have no entry in dataset.json, e.g. {unlabeled[:3]}")
    return np.array([table[f] for f in fnames], dtype=np.int64)


class ZipImageDataset(ImageDataset):
    """EDM dataset zip, read in place (one ZipFile handle per process, reopened after fork)."""

    def __init__(self, path, resolution=None, num_classes=None, channels=3, xflip=False):
        path = str(path)
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
                self._fnames = sorted(n for n in names if _is_image(n) and not n.endswith("/"))
                meta = zf.read("dataset.json") if "dataset.json" in names else None
        except zipfile.BadZipFile as e:
            raise ValueError(f"{path}: not a readable zip file ({e})") from e
        self._zf = None
        self._zf_pid = None
        self.path = path
        labels = _labels_from_json(path, meta, self._fnames) if meta is not None and self._fnames else None
        super().__init__(path, labels, resolution=resolution, num_classes=num_classes, channels=channels,
                         xflip=xflip)

    def __len__(self):
        return len(self._fnames)

    def _zip(self) -> zipfile.ZipFile:
        # A handle inherited through fork shares its file offset with the parent: reopen per process.
        if self._zf is None or self._zf_pid != os.getpid():
            self._zf = zipfile.ZipFile(self.path)
            self._zf_pid = os.getpid()
        return self._zf

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_zf"] = None
        state["_zf_pid"] = None
        return state

    def _raw(self, i):
        name = self._fnames[i]
        return self._decode(self._zip().read(name), name)

    def _item_name(self, i):
        return self._fnames[i]

    def _layout_hint(self):
        return "image files (PNG) in the zip, as written by EDM's dataset_tool.py"


class FolderImageDataset(ImageDataset):
    """A folder with dataset.json (EDM layout), with one sub-folder per class, or flat and unlabeled."""

    def __init__(self, path, resolution=None, num_classes=None, channels=3, xflip=False):
        root = Path(path)
        self.path = str(root)
        self.class_names: list[str] | None = None
        labels = None
        if (root / "dataset.json").is_file():
            self._files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                                 if p.is_file() and _is_image(p.name))
            if self._files:
                labels = _labels_from_json(self.path, (root / "dataset.json").read_bytes(), self._files)
        else:
            top = sorted(p.name for p in root.iterdir() if p.is_file() and _is_image(p.name))
            classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
            per_class = {c: sorted(p.relative_to(root).as_posix() for p in (root / c).rglob("*")
                                   if p.is_file() and _is_image(p.name)) for c in classes}
            per_class = {c: f for c, f in per_class.items() if f}
            if per_class and top:
                raise ValueError(f"{self.path}: has images both at the top level ({top[:2]}) and in sub-folders "
                                 f"({sorted(per_class)[:2]}); use one class sub-folder per class, or a flat "
                                 "folder")
            if per_class:
                names = sorted(per_class)
                if all(n.isdigit() for n in names):  # folders named by class index keep their index
                    index = {n: int(n) for n in names}
                else:
                    index = {n: i for i, n in enumerate(names)}
                self.class_names = names
                self._files = [f for n in names for f in per_class[n]]
                labels = np.array([index[n] for n in names for _ in per_class[n]], dtype=np.int64)
            else:
                self._files = top
        super().__init__(self.path, labels, resolution=resolution, num_classes=num_classes, channels=channels,
                         xflip=xflip)

    def __len__(self):
        return len(self._files)

    def _raw(self, i):
        name = self._files[i]
        with open(os.path.join(self.path, name), "rb") as f:
            return self._decode(f.read(), name)

    def _item_name(self, i):
        return self._files[i]

    def _layout_hint(self):
        return "image files, either in one sub-folder per class or directly in the folder"


def npz_member(path: str, key: str):
    """The array `key` of an npz; memory-mapped when the member is stored uncompressed."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(key + ".npy")
    if info.compress_type == zipfile.ZIP_STORED:
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            f.seek(info.header_offset + 30 + name_len + extra_len)
            version = np.lib.format.read_magic(f)
            reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version in reader:
                shape, fortran, dtype = reader[version](f)
                if not dtype.hasobject:
                    return np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape,
                                     order="F" if fortran else "C")
    with np.load(path, allow_pickle=False) as z:
        try:
            return z[key]
        except ValueError as e:  # numpy's message would suggest allow_pickle: loading it would run the file
            if "pickle" not in str(e) and "Object arrays" not in str(e):
                raise
            raise ValueError(f"{path}: array {key!r} holds Python objects, not numbers; fdistill reads only plain "
                             "numeric arrays (np.savez of uint8 images)") from None


class NpzImageDataset(ImageDataset):
    """uint8 images in an npz (NHWC, NCHW or flattened CHW rows) with optional labels."""

    def __init__(self, path, resolution=None, num_classes=None, channels=3, xflip=False, label_offset=0):
        path = str(path)
        self.path = path
        labels = None
        if path.endswith(".npy"):
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        else:
            try:
                with np.load(path, allow_pickle=False) as z:
                    keys = list(z.files)
            except (zipfile.BadZipFile, ValueError, OSError) as e:
                raise ValueError(f"{path}: not a readable npz file ({e})") from e
            ik = next((k for k in _IMAGE_KEYS if k in keys), None)
            if ik is None:
                raise ValueError(f"{path}: no image array; expected one of {list(_IMAGE_KEYS)}, found {keys}")
            arr = npz_member(path, ik)
            lk = next((k for k in _LABEL_KEYS if k in keys), None)
            if lk is not None:
                lab = np.asarray(npz_member(path, lk))
                if lab.ndim == 2:  # one-hot rows
                    lab = lab.argmax(axis=1)
                if lab.ndim != 1:
                    raise ValueError(f"{path}: labels '{lk}' have shape {lab.shape}; expected (N,) or (N, classes)")
                labels = lab.astype(np.int64) + int(label_offset)
        if arr.dtype != np.uint8:
            raise ValueError(f"{path}: images are {arr.dtype}; expected uint8 pixels in [0, 255]")
        if arr.ndim == 2:  # rows of flattened CHW pixels (the downsampled-ImageNet npz layout)
            side = math.isqrt(arr.shape[1] // channels)
            if side * side * channels != arr.shape[1]:
                raise ValueError(f"{path}: rows of {arr.shape[1]} values are not {channels}xRxR images")
            self._layout = ("flat", side)
        elif arr.ndim == 4 and arr.shape[-1] in (1, 3, 4) and arr.shape[1] not in (1, 3, 4):
            self._layout = ("nhwc", None)
        elif arr.ndim == 4 and arr.shape[1] in (1, 3, 4):
            self._layout = ("nchw", None)
        else:
            raise ValueError(f"{path}: image array of shape {arr.shape}; expected (N, H, W, C), (N, C, H, W) "
                             "or (N, C*H*W)")
        self._arr = arr
        super().__init__(path, labels, resolution=resolution, num_classes=num_classes, channels=channels,
                         xflip=xflip)

    def __len__(self):
        return int(self._arr.shape[0])

    def _raw(self, i):
        kind, side = self._layout
        a = np.asarray(self._arr[i])
        if kind == "flat":
            a = a.reshape(self.channels, side, side).transpose(1, 2, 0)
        elif kind == "nchw":
            a = a.transpose(1, 2, 0)
        return _to_channels(a, self.channels, f"{self.path}: image {i}")

    def _layout_hint(self):
        return "a non-empty uint8 image array"


def open_image_dataset(path, resolution: int | None = None, num_classes: int | None = None, *, channels: int = 3,
                       xflip: bool = False, label_offset: int = 0) -> ImageDataset:
    """Open an image dataset by its path: EDM zip, folder, or npz/npy (see the module docstring)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(
            f"{p}: dataset not found. Give an EDM dataset zip (e.g. imagenet-64x64.zip from EDM's dataset_tool.py), "
            "a folder of class sub-folders, or an .npz of uint8 images")
    kw = dict(resolution=resolution, num_classes=num_classes, channels=channels, xflip=xflip)
    if p.is_dir():
        return FolderImageDataset(p, **kw)
    suffix = p.suffix.lower()
    if suffix == ".zip":
        return ZipImageDataset(p, **kw)
    if suffix in (".npz", ".npy"):
        return NpzImageDataset(p, label_offset=label_offset, **kw)
    raise ValueError(f"{p}: unknown dataset format '{suffix}'; expected a .zip (EDM dataset), a folder, "
                     "or a .npz/.npy array file")


def make_image_loader(dataset: Dataset, batch_size: int, *, num_workers: int = 0, shuffle: bool = True,
                      drop_last: bool = True, seed: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader with a seeded shuffle; workers stay alive between epochs."""
    if drop_last and len(dataset) < batch_size:
        raise ValueError(f"the dataset has {len(dataset)} images, fewer than one batch of {batch_size}")
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=num_workers,
                      generator=g, pin_memory=pin_memory, persistent_workers=num_workers > 0)


def infinite_batches(loader: DataLoader) -> Iterator:
    """Batches forever, epoch after epoch (a new shuffle each epoch)."""
    while True:
        n = 0
        for batch in loader:
            n += 1
            yield batch
        if n == 0:
            raise ValueError("the data loader produced no batches")
