"""Images in and out: [-1, 1] tensors <-> uint8, sample grids, EDM's npz format written in a stream, and the
resumable stores of ``fdistill sample`` (a PNG folder, or npz chunks that become one npz).
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float NCHW -> uint8 NHWC (EDM's convention)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def save_grid(images: torch.Tensor, path, nrow: int = 10, pad: int = 2, titles: list[str] | None = None):
    """Save [-1, 1] NCHW images as one PNG grid; several grids side by side if ``images`` is a list."""

    groups = images if isinstance(images, (list, tuple)) else [images]
    tiles = []
    for g in groups:
        u8 = to_uint8(g).numpy()
        n, h, w, c = u8.shape
        rows = (n + nrow - 1) // nrow
        canvas = Image.new("RGB", (nrow * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
        for i in range(n):
            im = Image.fromarray(u8[i, :, :, 0] if c == 1 else u8[i], "L" if c == 1 else "RGB").convert("RGB")
            canvas.paste(im, (pad + (i % nrow) * (w + pad), pad + (i // nrow) * (h + pad)))
        tiles.append(canvas)
    scale = max(1, 256 // max(t.width for t in tiles))
    tiles = [t.resize((t.width * scale, t.height * scale), Image.NEAREST) for t in tiles]
    top = 16 if titles else 0
    W = sum(t.width for t in tiles) + 8 * (len(tiles) - 1)
    H = max(t.height for t in tiles) + top
    out = Image.new("RGB", (W, H), (255, 255, 255))
    xoff = 0
    draw = ImageDraw.Draw(out)
    for i, t in enumerate(tiles):
        out.paste(t, (xoff, top))
        if titles:
            draw.text((xoff + 2, 2), titles[i], fill=(0, 0, 0))
        xoff += t.width + 8
    out.save(path)
    return out



def u8_to_float(u8) -> torch.Tensor:
    """uint8 NHWC -> [-1, 1] float NCHW."""
    return torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 127.5 - 1


SAMPLE_META = "sample_meta.json"


def _check_settings(root, settings: dict):

    path = root / SAMPLE_META
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            raise ValueError(f"{root} holds images from other weights or settings ({', '.join(diff)} differ: "
                             f"{ {k: old.get(k) for k in diff} } there, { {k: settings.get(k) for k in diff} } now); "
                             "choose another output, or delete it to start over")
    else:
        path.write_text(json.dumps(settings, indent=1))


def _check_record(root, seed: int, have: dict, want: dict):
    if have != want:
        raise ValueError(f"{root} holds seed {seed} generated with {have}, but this run asks for {want}: the "
                         "label/prompt settings changed. Choose another output, or delete it to start over")


class PngStore:
    """DIR/{seed:06d}.png, plus DIR/index.jsonl recording each seed's label or prompt. The index line is appended
    after the image is in place (written to a temporary name and renamed), so an image counts as done only when
    both exist; a killed run leaves nothing half-written that a rerun would skip."""

    def __init__(self, root, settings: dict):

        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        _check_settings(root, settings)
        self.records: dict[int, dict] = {}
        index = root / "index.jsonl"
        if index.is_file():
            for line in index.read_text().splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
                self.records[int(r.pop("seed"))] = r

    def path(self, seed: int):
        return self.root / f"{seed:06d}.png"

    def has(self, seed: int, record: dict) -> bool:
        if seed not in self.records or not self.path(seed).is_file():
            return False
        _check_record(self.root, seed, self.records[seed], record)
        return True

    def write(self, seeds, images, records):

        def save(args):
            seed, img = args
            tmp = self.root / f".{seed:06d}.tmp.png"
            Image.fromarray(img[:, :, 0] if img.shape[-1] == 1 else img).save(tmp, compress_level=1)
            os.replace(tmp, self.path(seed))

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(save, zip(seeds, images)))
        with open(self.root / "index.jsonl", "a") as f:
            for seed, r in zip(seeds, records):
                f.write(json.dumps({"seed": int(seed), **r}) + "\n")
                self.records[int(seed)] = dict(r)

    def flush(self):
        pass

    def read(self, seeds):

        out = []
        for s in seeds:
            with Image.open(self.path(s)) as im:
                a = np.asarray(im)
            out.append(a[:, :, None] if a.ndim == 2 else a)
        return np.stack(out)


class ChunkStore:
    """PATH.parts/chunk-*.npz, each holding some images with their seeds and labels/prompts (written atomically
    every ``chunk`` images): the resumable staging area of an npz when no --outdir is given."""

    def __init__(self, root, settings: dict, chunk: int = 1000):

        self.root, self.chunk = root, chunk
        root.mkdir(parents=True, exist_ok=True)
        _check_settings(root, settings)
        self.records: dict[int, dict] = {}
        self.where: dict[int, tuple] = {}
        self.files = sorted(root.glob("chunk-*.npz"))
        for f in self.files:
            try:
                with np.load(f, allow_pickle=False) as d:
                    for row, s in enumerate(d["seeds"].tolist()):
                        self.records[s] = _record_from(d, row)
                        self.where[s] = (f, row)
                    if len(d["images"]) != len(d["seeds"]):  # reads the images: a truncated chunk fails here
                        raise ValueError("images and seeds differ in number")
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as e:
                raise ValueError(f"{f} is unreadable ({type(e).__name__}: truncated or damaged); delete it and "
                                 "rerun: its images are generated again") from None
        self.buf: list = []

    def has(self, seed: int, record: dict) -> bool:
        if seed not in self.records:
            return False
        _check_record(self.root, seed, self.records[seed], record)
        return True

    def write(self, seeds, images, records):
        self.buf.extend(zip(seeds, images, records))
        if len(self.buf) >= self.chunk:
            self.flush()

    def flush(self):

        if not self.buf:
            return
        seeds, images, records = zip(*self.buf)
        f = self.root / f"chunk-{len(self.files):06d}.npz"
        tmp = self.root / f".{f.stem}.tmp.npz"
        arrays = {"images": np.stack(images), "seeds": np.asarray(seeds, dtype=np.int64)}
        arrays.update(record_arrays(records))
        np.savez(tmp, **arrays)
        os.replace(tmp, f)
        self.files.append(f)
        for row, (s, r) in enumerate(zip(seeds, records)):
            self.records[int(s)] = dict(r)
            self.where[int(s)] = (f, row)
        self.buf = []

    def read(self, seeds):

        cache: dict = {}
        out = []
        for s in seeds:
            f, row = self.where[int(s)]
            if f not in cache:
                cache.clear()  # chunks are read in order: keep one open
                with np.load(f, allow_pickle=False) as d:
                    cache[f] = d["images"]
            out.append(cache[f][row])
        return np.stack(out)


def record_arrays(records) -> dict:

    out = {}
    if any("label" in r for r in records):
        out["labels"] = np.asarray([r["label"] for r in records], dtype=np.int64)
    if any("prompt" in r for r in records):
        out["prompts"] = np.asarray([r["prompt"] for r in records], dtype=str)
    return out


def _record_from(d, row: int) -> dict:
    r = {}
    if "labels" in d:
        r["label"] = int(d["labels"][row])
    if "prompts" in d:
        r["prompt"] = str(d["prompts"][row])
    return r


def write_image_npz(path, n: int, image_shape, blocks, extra: dict):
    """An npz in EDM's sample format, streamed: ``arr_0`` uint8 [n, H, W, C] written block by block (stored, not
    compressed, so readers can memory-map it), plus the arrays in ``extra`` (seeds, labels, prompts). Written to
    a temporary file and renamed."""

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    written = 0
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                                         "fortran_order": False, "shape": (n, *image_shape)})
                for block in blocks:
                    block = np.ascontiguousarray(block, dtype=np.uint8)
                    if tuple(block.shape[1:]) != tuple(image_shape):
                        raise ValueError(f"image block of shape {block.shape[1:]} in an npz of {image_shape} images")
                    f.write(block.tobytes())
                    written += len(block)
            if written != n:
                raise RuntimeError(f"{written} images written to {path}, expected {n}")
            for k, v in extra.items():
                with zf.open(f"{k}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asarray(v), allow_pickle=False)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
