"""CLIP score with a stub model (exact known values) and a tiny random open_clip model, offline."""

import json
import os
import socket

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

import open_clip

from fdistill.metrics.clip_score import clip_score, clip_similarities, load_clip
from fdistill.commands.eval import main as eval_main

EMBED, CTX, SIZE = 16, 16, 32
MODEL_CFG = {
    "embed_dim": EMBED,
    "vision_cfg": {"image_size": SIZE, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": CTX, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**MODEL_CFG).eval()
    preprocess = open_clip.transform.image_transform(SIZE, is_train=False)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=CTX)
    return model, preprocess, tokenizer


def _images(n, seed=0, size=40):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Known values with a stub model


class _Stub(torch.nn.Module):
    """Image embedding: a fixed direction e1 at a random scale. Text 'angle:<t>': the unit vector at angle t from
    e1 (in the e1-e2 plane), also at a random scale. The cosine of pair i is therefore cos(t_i), exactly."""

    def encode_image(self, x):
        e = torch.zeros(len(x), 4)
        e[:, 0] = torch.rand(len(x)) * 5 + 0.1
        return e

    def encode_text(self, tokens):
        t = tokens[:, 0]
        scale = torch.rand(len(t)) * 3 + 0.5
        return torch.stack([torch.cos(t), torch.sin(t), torch.zeros_like(t), torch.zeros_like(t)], 1) * scale[:, None]


def _stub_tokenizer(prefix):
    def tok(texts):
        assert all(s.startswith(prefix) for s in texts)
        return torch.tensor([[float(s[len(prefix):].split(":")[1])] for s in texts])
    return tok


def _stub_preprocess(im):
    return torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1)


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_known_cosines_with_stub_model(batch_size):
    angles = np.array([0.0, 0.3, 1.2, np.pi / 2, 2.5])
    caps = [f"angle:{float(a)!r}" for a in angles]
    prefix = "A photo depicts "
    sims = clip_similarities(_images(5), caps, model=_Stub(), preprocess=_stub_preprocess,
                             tokenizer=_stub_tokenizer(prefix), batch_size=batch_size, prefix=prefix)
    np.testing.assert_allclose(sims, np.cos(angles), atol=1e-6)
    score = clip_score(_images(5), caps, model=_Stub(), preprocess=_stub_preprocess,
                       tokenizer=_stub_tokenizer(""), prefix="", batch_size=batch_size)
    assert score == pytest.approx(np.cos(angles).mean(), abs=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# A tiny random open_clip model


def _manual(model, preprocess, tokenizer, image, captions, prefix):
    with torch.no_grad():
        e = model.encode_image(preprocess(Image.fromarray(image))[None])
        t = model.encode_text(tokenizer([prefix + c for c in captions]))
    return torch.nn.functional.cosine_similarity(e, t, dim=-1).double().numpy()


def test_identical_images_give_the_known_value(tiny):
    """All images identical -> one image embedding; the score is its mean cosine with the captions' embeddings."""
    model, preprocess, tokenizer = tiny
    img = _images(1, seed=1, size=SIZE)[0]
    caps = ["a red square", "two dogs on a beach", "a bowl of soup", "a red square"]
    images = np.stack([img] * len(caps))
    expected = _manual(model, preprocess, tokenizer, img, caps, prefix="")
    for bs in (1, 3):
        sims = clip_similarities(images, caps, model=model, preprocess=preprocess, tokenizer=tokenizer,
                                 batch_size=bs, prefix="", pre_resize=None)
        np.testing.assert_allclose(sims, expected, atol=1e-5)
    assert sims[0] == pytest.approx(sims[3], abs=1e-6)  # identical pair, identical value
    assert np.all(np.abs(sims) <= 1 + 1e-6) and len(set(np.round(sims[:3], 6))) == 3
    # The prefix changes the text embedding, and is applied exactly as written.
    with_prefix = clip_similarities(images, caps, model=model, preprocess=preprocess, tokenizer=tokenizer,
                                    prefix="A photo depicts ", pre_resize=None)
    np.testing.assert_allclose(with_prefix, _manual(model, preprocess, tokenizer, img, caps, "A photo depicts "),
                               atol=1e-5)
    assert np.abs(with_prefix - sims).max() > 1e-4


def test_input_forms_agree(tiny, tmp_path):
    model, preprocess, tokenizer = tiny
    u8 = _images(3, seed=2)
    caps = ["a cat", "a dog", "a car"]
    kw = dict(model=model, preprocess=preprocess, tokenizer=tokenizer)
    ref = clip_similarities(u8, caps, **kw)
    t = (torch.from_numpy(u8).permute(0, 3, 1, 2).double() - 128) / 127.5
    np.testing.assert_allclose(clip_similarities(t.float(), caps, **kw), ref, atol=1e-6)
    paths = []
    for i, im in enumerate(u8):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(im).save(paths[-1])
    np.testing.assert_allclose(clip_similarities(paths, caps, **kw), ref, atol=1e-6)
    with pytest.raises(ValueError, match="captions"):
        clip_similarities(u8, caps[:2], **kw)


def _save_local_dir(model, folder):
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": MODEL_CFG}))
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


def test_local_dir_and_checkpoint_loading(tiny, tmp_path):
    model, _, _ = tiny
    folder = _save_local_dir(model, tmp_path / "tiny_clip")
    m2, pre2, tok2 = load_clip(f"local-dir:{folder}")
    for a, b in zip(model.state_dict().values(), m2.state_dict().values()):
        torch.testing.assert_close(a, b)
    imgs, caps = _images(2, seed=3), ["a tree", "a boat"]
    s_loaded = clip_score(imgs, caps, model_name=f"local-dir:{folder}")
    s_memory = clip_score(imgs, caps, model=model, preprocess=pre2, tokenizer=tok2)
    assert s_loaded == pytest.approx(s_memory, abs=1e-6)
    # Without weights: an error, never a silently random model.
    with pytest.raises(ValueError, match="No CLIP weights"):
        load_clip("ViT-B-32")
    with pytest.raises(FileNotFoundError):
        load_clip("ViT-B-32", pretrained=str(tmp_path / "missing.bin"))
    empty = tmp_path / "no_weights"
    empty.mkdir()
    (empty / "open_clip_config.json").write_text(json.dumps({"model_cfg": MODEL_CFG}))
    with pytest.raises(FileNotFoundError, match="no CLIP weights"):
        load_clip(f"local-dir:{empty}")


def test_cli_clip_on_npz_and_folder(tiny, tmp_path, capsys):
    model, _, _ = tiny
    folder = _save_local_dir(model, tmp_path / "tiny_clip")
    imgs = _images(3, seed=4)
    caps = ["a house", "a horse", "a hill"]
    np.savez(tmp_path / "samples.npz", arr_0=imgs, captions=np.array(caps))
    out = tmp_path / "clip.json"
    assert eval_main(["clip", str(tmp_path / "samples.npz"), "--model", f"local-dir:{folder}", "--device", "cpu",
                      "--out", str(out), "--quiet"]) == 0
    res = json.loads(out.read_text())
    expected = clip_score(imgs, caps, model_name=f"local-dir:{folder}")
    assert res["clip_score"] == pytest.approx(expected, abs=1e-6)
    assert res["protocol"]["num_pairs"] == 3 and res["protocol"]["prefix"] == "A photo depicts "
    assert res["protocol"]["pre_resize"] == 256
    # A folder with captions in a .txt file, one per line in sorted file order.
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(img_dir / f"{i:03d}.png")
    (tmp_path / "caps.txt").write_text("\n".join(caps) + "\n")
    capsys.readouterr()
    assert eval_main(["clip", str(img_dir), "--captions", str(tmp_path / "caps.txt"), "--model",
                      f"local-dir:{folder}", "--device", "cpu", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["clip_score"] == pytest.approx(expected, abs=1e-6)
    # Count mismatch is reported, not truncated silently.
    (tmp_path / "two.txt").write_text("a\nb\n")
    assert eval_main(["clip", str(img_dir), "--captions", str(tmp_path / "two.txt"), "--model",
                      f"local-dir:{folder}", "--device", "cpu", "--quiet"]) == 2
