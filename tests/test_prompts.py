"""The one prompt reader (fdistill.prompts) that training, `fdistill sample`, COCO-30k and the CLIP score share."""

import json

import pytest

from fdistill.prompts import coco_captions_by_file, read_prompts


def test_formats_by_suffix(tmp_path):
    (tmp_path / "p.txt").write_text("a  red bus\n\n two dogs \n")
    assert read_prompts(tmp_path / "p.txt") == ["a red bus", "two dogs"]
    assert read_prompts(tmp_path / "p.txt", keep_blank_lines=True) == ["a red bus", "", "two dogs"]
    (tmp_path / "l.json").write_text(json.dumps(["x", "y\nz"]))
    assert read_prompts(tmp_path / "l.json") == ["x", "y z"]
    coco = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
            "annotations": [{"id": 9, "image_id": 2, "caption": "a cat"}, {"id": 3, "image_id": 1, "caption": "a dog "}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    assert read_prompts(tmp_path / "c.json") == ["a cat", "a dog"]
    assert coco_captions_by_file(tmp_path / "c.json") == {"b.jpg": ["a cat"], "a.jpg": ["a dog"]}
    (tmp_path / "m.json").write_text(json.dumps({"b.png": "second", "a.png": "first"}))
    assert read_prompts(tmp_path / "m.json", image_names=["a.png", "b.png"]) == ["first", "second"]
    with pytest.raises(ValueError, match="folder of images"):
        read_prompts(tmp_path / "m.json")


def test_jsonl_gives_the_prompt_field_not_the_raw_line(tmp_path):
    # `fdistill sample --prompts x.jsonl` once took each JSON line, braces and all, as the prompt
    rows = [{"prompt": "a red bus"}, {"caption": "two dogs"}, {"text": "a plate"}, "a bare string"]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert read_prompts(tmp_path / "p.jsonl") == ["a red bus", "two dogs", "a plate", "a bare string"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"title": "no field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*prompt, caption, text"):
        read_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"prompt": \n')
    with pytest.raises(ValueError, match="broken.jsonl:1: not a JSON line"):
        read_prompts(tmp_path / "broken.jsonl")


def test_missing_file_names_the_formats(tmp_path):
    with pytest.raises(FileNotFoundError, match="COCO captions JSON"):
        read_prompts(tmp_path / "nope.txt")
