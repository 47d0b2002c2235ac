"""Reading prompts and captions: the one reader that training, sampling, COCO-30k and the CLIP score share.

Formats, by suffix:
  .json   a COCO captions file (2014 format: every annotation's caption), a list of strings, or
          {image file name: caption} (with ``image_names``: the captions of those images, in their order)
  .jsonl  one JSON object per line with a 'prompt', 'caption' or 'text' field (or a JSON string per line)
  other   plain text, one prompt per line
Whitespace inside a prompt is collapsed (COCO captions carry stray newlines and double spaces).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

_JSONL_KEYS = ("prompt", "caption", "text")


def clean(text: str) -> str:
    return " ".join(str(text).split())


def read_prompts(path: str | os.PathLike, image_names: list[str] | None = None,
                 keep_blank_lines: bool = False) -> list[str]:
    """Prompts from ``path`` (formats above). ``keep_blank_lines``: a text file's empty lines stay (as ''), for
    captions paired with images by position."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt file {p} not found (a COCO captions JSON such as "
                                "annotations/captions_train2014.json, a .jsonl, or a .txt with one prompt per line)")
    suffix = p.suffix.lower()
    if suffix == ".json":
        data = json.loads(p.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "annotations" in data:
            return [clean(a["caption"]) for a in data["annotations"]]
        if isinstance(data, list) and all(isinstance(x, str) for x in data):
            return [clean(x) for x in data]
        if isinstance(data, dict) and all(isinstance(x, str) for x in data.values()):
            if image_names is None:
                raise ValueError(f"{p} maps file names to captions, which needs a folder of images")
            missing = [n for n in image_names if n not in data]
            if missing:
                raise ValueError(f"{p} has no caption for {missing[:3]}{'...' if len(missing) > 3 else ''}")
            return [clean(data[n]) for n in image_names]
        raise ValueError(f"{p}: expected a COCO captions JSON (with 'annotations'), a list of strings, or "
                         "{file name: caption}")
    lines = p.read_text(encoding="utf-8").splitlines()
    if suffix == ".jsonl":
        out = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{i}: not a JSON line ({e.msg})") from None
            if isinstance(obj, str):
                out.append(clean(obj))
                continue
            key = next((k for k in _JSONL_KEYS if isinstance(obj, dict) and k in obj), None)
            if key is None:
                raise ValueError(f"{p}:{i}: a line needs one of the fields {', '.join(_JSONL_KEYS)}: {line[:80]}")
            out.append(clean(obj[key]))
        return out
    prompts = [clean(line) for line in lines]
    return prompts if keep_blank_lines else [x for x in prompts if x]


def coco_captions_by_file(path: str | os.PathLike) -> dict[str, list[str]]:
    """{image file name: [captions]} from a COCO captions JSON."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not (isinstance(data, dict) and "images" in data and "annotations" in data):
        raise ValueError(f"{path} is not a COCO captions JSON (needs 'images' and 'annotations')")
    names = {im["id"]: im["file_name"] for im in data["images"]}
    out: dict[str, list[str]] = {}
    for a in data["annotations"]:
        if a["image_id"] in names:
            out.setdefault(names[a["image_id"]], []).append(clean(a["caption"]))
    return out
