"""Image datasets: EDM zip (read in place), class folders, npz; labels, workers and error messages."""

import io
import json
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from fdistill.data import (FolderImageDataset, NpzImageDataset, ZipImageDataset, infinite_batches,
                           make_image_loader, one_hot, open_image_dataset)
from fdistill.data import images as images_mod

R = 8


def _pixels(n, seed=0, res=R):
    return np.random.default_rng(seed).integers(0, 256, size=(n, res, res, 3), dtype=np.uint8)


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_edm_zip(path, pixels, labels, extra_json_entries=(), drop=()):
    """EDM dataset_tool layout: 00000/img00000000.png ... plus dataset.json."""
    names = [f"{i // 1000:05d}/img{i:08d}.png" for i in range(len(pixels))]
    with zipfile.ZipFile(path, "w") as zf:
        for i, (name, arr) in enumerate(zip(names, pixels)):
            if i not in drop:
                zf.writestr(name, _png(arr))
        if labels is not False:
            entries = None if labels is None else [[n, int(l)] for n, l in zip(names, labels)]
            if entries is not None:
                entries += list(extra_json_entries)
            zf.writestr("dataset.json", json.dumps({"labels": entries}))
    return names


def _expected(arr):
    return torch.from_numpy(arr.transpose(2, 0, 1).copy()).float() / 127.5 - 1


# ----------------------------------------------------------------------------------------------------------


def test_edm_zip_items_labels_and_values(tmp_path):
    px = _pixels(6)
    labels = [3, 0, 999, 5, 5, 1]
    make_edm_zip(tmp_path / "imagenet-64x64.zip", px, labels)
    ds = open_image_dataset(tmp_path / "imagenet-64x64.zip", resolution=R, num_classes=1000)
    assert isinstance(ds, ZipImageDataset)
    assert len(ds) == 6 and ds.has_labels and ds.num_classes == 1000 and ds.resolution == R
    for i in range(6):
        x, y = ds[i]
        assert x.dtype == torch.float32 and x.shape == (3, R, R)
        assert -1 <= x.min() and x.max() <= 1
        torch.testing.assert_close(x, _expected(px[i]))
        assert y == labels[i]
    oh = one_hot(torch.tensor([ds[2][1], -1]), 1000)
    assert oh.shape == (2, 1000) and oh[0, 999] == 1 and oh[0].sum() == 1 and oh[1].sum() == 0
    # read in place: nothing extracted next to the zip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imagenet-64x64.zip"]


def test_edm_zip_unlabeled(tmp_path):
    px = _pixels(3)
    make_edm_zip(tmp_path / "a.zip", px, None)  # "labels": null
    make_edm_zip(tmp_path / "b.zip", px, False)  # no dataset.json at all
    for name in ("a.zip", "b.zip"):
        ds = open_image_dataset(tmp_path / name)
        assert not ds.has_labels and [ds[i][1] for i in range(3)] == [-1, -1, -1]


def test_zip_handle_is_per_process(tmp_path, monkeypatch):
    make_edm_zip(tmp_path / "d.zip", _pixels(4), [0, 1, 2, 3])
    ds = ZipImageDataset(tmp_path / "d.zip")
    ds[0]
    first = ds._zf
    assert ds._zip() is first  # reused within a process
    real_pid = os.getpid()
    monkeypatch.setattr(images_mod.os, "getpid", lambda: real_pid + 1)  # as seen in a forked worker
    assert ds._zip() is not first
    # pickling (spawned workers) drops the handle instead of trying to send it
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._zf is None and clone[3][1] == 3


def test_zip_streams_through_dataloader_workers(tmp_path):
    px = _pixels(10, seed=1)
    labels = list(range(10))
    make_edm_zip(tmp_path / "d.zip", px, labels)
    ds = open_image_dataset(tmp_path / "d.zip", num_classes=10)
    ds[0]  # the parent holds an open handle before the workers fork
    loader = make_image_loader(ds, batch_size=5, num_workers=2, shuffle=True, seed=0)
    seen = {}
    for x, y in loader:
        assert x.shape == (5, 3, R, R) and y.dtype == torch.int64
        for xi, yi in zip(x, y):
            seen[int(yi)] = xi
    assert sorted(seen) == labels
    for i in labels:
        torch.testing.assert_close(seen[i], _expected(px[i]))
    it = infinite_batches(loader)
    assert sum(next(it)[0].shape[0] for _ in range(5)) == 25  # runs past the end of an epoch
    with pytest.raises(ValueError, match="fewer than one batch"):
        make_image_loader(ds, batch_size=64)


def test_class_folders_flat_folder_and_index_named_folders(tmp_path):
    px = _pixels(6, seed=2)
    for i, cls in enumerate(["n015", "n015", "n002", "n002", "n002", "n990"]):
        (tmp_path / "cls" / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(px[i]).save(tmp_path / "cls" / cls / f"{i}.png")
    ds = open_image_dataset(tmp_path / "cls", num_classes=1000)
    assert isinstance(ds, FolderImageDataset) and ds.class_names == ["n002", "n015", "n990"]
    got = sorted((ds._files[i], ds[i][1]) for i in range(len(ds)))
    assert got == [("n002/2.png", 0), ("n002/3.png", 0), ("n002/4.png", 0), ("n015/0.png", 1),
                   ("n015/1.png", 1), ("n990/5.png", 2)]
    i = ds._files.index("n990/5.png")
    torch.testing.assert_close(ds[i][0], _expected(px[5]))

    for i, cls in enumerate(["7", "0", "7"]):  # folders named by class index keep that index
        (tmp_path / "idx" / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(px[i]).save(tmp_path / "idx" / cls / f"{i}.png")
    ds = open_image_dataset(tmp_path / "idx", num_classes=10)
    assert sorted(ds[i][1] for i in range(3)) == [0, 7, 7]

    (tmp_path / "flat").mkdir()
    for i in range(2):
        Image.fromarray(px[i]).save(tmp_path / "flat" / f"{i}.jpg", quality=100)
    ds = open_image_dataset(tmp_path / "flat")
    assert not ds.has_labels and ds[1][1] == -1 and ds[1][0].shape == (3, R, R)


def test_npz_layouts_and_memmap(tmp_path):
    px = _pixels(5, seed=3)
    y = np.array([4, 3, 2, 1, 0])
    np.savez(tmp_path / "nhwc.npz", x=px, y=y)
    np.savez_compressed(tmp_path / "nchw.npz", images=px.transpose(0, 3, 1, 2),
                        labels=np.eye(5, dtype=np.float32)[y])
    np.savez(tmp_path / "flat.npz", data=px.transpose(0, 3, 1, 2).reshape(5, -1), labels=y + 1)
    a = open_image_dataset(tmp_path / "nhwc.npz", num_classes=5)
    b = open_image_dataset(tmp_path / "nchw.npz", num_classes=5)
    c = open_image_dataset(tmp_path / "flat.npz", num_classes=5, label_offset=-1)  # 1-based labels
    assert isinstance(a, NpzImageDataset) and isinstance(a._arr, np.memmap)  # stored member: not loaded
    for ds in (a, b, c):
        for i in range(5):
            x, lab = ds[i]
            torch.testing.assert_close(x, _expected(px[i]))
            assert lab == y[i]


def test_one_hot_rejects_out_of_range():
    with pytest.raises(ValueError, match="outside"):
        one_hot([0, 10], 10)


# ----------------------------------------------------------------------------------------------------------
# Clear errors


def test_missing_empty_and_unknown_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.zip.*dataset not found"):
        open_image_dataset(tmp_path / "nope.zip")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        open_image_dataset(tmp_path / "empty")
    with zipfile.ZipFile(tmp_path / "empty.zip", "w") as zf:
        zf.writestr("dataset.json", json.dumps({"labels": []}))
    with pytest.raises(ValueError, match="empty.zip: no images found"):
        open_image_dataset(tmp_path / "empty.zip")
    (tmp_path / "broken.zip").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable zip"):
        open_image_dataset(tmp_path / "broken.zip")
    (tmp_path / "data.h5").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown dataset format"):
        open_image_dataset(tmp_path / "data.h5")
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, R, R, 3), np.uint8))
    with pytest.raises(ValueError, match="no images found"):
        open_image_dataset(tmp_path / "empty.npz")


def test_mislabeled_datasets(tmp_path):
    px = _pixels(3)
    make_edm_zip(tmp_path / "range.zip", px, [0, 1, 1000])
    with pytest.raises(ValueError, match=r"label 1000 of 00000/img00000002.png is outside \[0, 1000\)"):
        open_image_dataset(tmp_path / "range.zip", num_classes=1000)
    make_edm_zip(tmp_path / "listed.zip", px, [0, 1, 2], drop={1})  # file listed in dataset.json is missing
    with pytest.raises(ValueError, match="not in the dataset.*img00000001.png"):
        open_image_dataset(tmp_path / "listed.zip")
    make_edm_zip(tmp_path / "extra.zip", px, [0, 1, 2], extra_json_entries=[["00000/img00000099.png", 0]])
    with pytest.raises(ValueError, match="img00000099.png"):
        open_image_dataset(tmp_path / "extra.zip")
    with zipfile.ZipFile(tmp_path / "unlab.zip", "w") as zf:
        zf.writestr("a.png", _png(px[0]))
        zf.writestr("b.png", _png(px[1]))
        zf.writestr("dataset.json", json.dumps({"labels": [["a.png", 0]]}))
    with pytest.raises(ValueError, match="no entry in dataset.json.*b.png"):
        open_image_dataset(tmp_path / "unlab.zip")
    np.savez(tmp_path / "neg.npz", x=px, y=np.array([0, -3, 1]))
    with pytest.raises(ValueError, match="label -3"):
        open_image_dataset(tmp_path / "neg.npz")


def test_resolution_mismatch(tmp_path):
    make_edm_zip(tmp_path / "d.zip", _pixels(2), [0, 1])
    with pytest.raises(ValueError, match=f"images are {R}x{R} but resolution 64"):
        open_image_dataset(tmp_path / "d.zip", resolution=64)
    with zipfile.ZipFile(tmp_path / "mixed.zip", "w") as zf:  # a stray image of another size
        zf.writestr("a.png", _png(_pixels(1)[0]))
        zf.writestr("b.png", _png(_pixels(1, res=16)[0]))
    ds = open_image_dataset(tmp_path / "mixed.zip")
    ds[0]
    with pytest.raises(ValueError, match="b.png is 16x16"):
        ds[1]
