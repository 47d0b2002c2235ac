"""Improved precision/recall on feature sets whose answer is known, chunking invariance, brute-force agreement."""

import json

import numpy as np
import pytest
import torch

from fdistill.commands.eval import main as eval_main
from fdistill.metrics.precision_recall import coverage, knn_radii, precision_recall


def _brute_force(real, fake, k):
    """Direct definition: full distance matrices, k-th neighbour excluding the point itself."""
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    def inside(q, m, r):
        d = np.linalg.norm(q[:, None] - m[None], axis=-1)
        return (d <= r[None]).any(axis=1)

    return inside(fake, real, radii(real)).mean(), inside(real, fake, radii(fake)).mean()


def test_identical_sets_give_one_one():
    x = np.random.default_rng(0).normal(size=(100, 16))
    r = precision_recall(x, x.copy(), k=3, chunk_size=17)
    assert r["precision"] == 1.0 and r["recall"] == 1.0


def test_disjoint_far_apart_sets_give_zero_zero():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(80, 16))
    fake = rng.normal(size=(60, 16)) + 100.0
    r = precision_recall(real, fake, k=3, chunk_size=32)
    assert r["precision"] == 0.0 and r["recall"] == 0.0


def test_subset_has_precision_one_and_partial_recall():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(200, 8))
    fake = real[rng.permutation(200)[:20]]
    r = precision_recall(real, fake, k=3, chunk_size=64)
    assert r["precision"] == 1.0
    assert r["recall"] < 1.0  # 20 points cannot cover 200 in 8 dimensions


def test_mode_dropping_lowers_recall_not_precision():
    """Fake covers one of two real clusters: precision stays high, recall about halves."""
    rng = np.random.default_rng(3)
    real = np.concatenate([rng.normal(size=(150, 4)), rng.normal(size=(150, 4)) + 50])
    fake = rng.normal(size=(150, 4))
    r = precision_recall(real, fake, k=3)
    assert r["precision"] > 0.9
    assert 0.4 < r["recall"] < 0.6


@pytest.mark.parametrize("chunk", [1, 7, 50, 10_000])
def test_chunking_does_not_change_the_answer_and_matches_brute_force(chunk):
    rng = np.random.default_rng(4)
    real = rng.normal(size=(90, 5))
    fake = rng.normal(size=(70, 5)) * 1.3 + 0.4
    p, rc = _brute_force(real, fake, 3)
    assert 0.0 < p < 1.0 and 0.0 < rc < 1.0  # a case where the answer is not trivial
    r = precision_recall(real, fake, k=3, chunk_size=chunk, dtype=torch.float64)
    assert r["precision"] == pytest.approx(p, abs=1e-12)
    assert r["recall"] == pytest.approx(rc, abs=1e-12)


def test_radii_and_coverage_directly():
    # Points on a line at 0, 1, 3, 7: 1st neighbour distances 1, 1, 2, 4.
    x = np.array([[0.0], [1.0], [3.0], [7.0]])
    r2 = knn_radii(x, k=1, chunk_size=3, dtype=torch.float64)
    torch.testing.assert_close(r2, torch.tensor([1.0, 1.0, 4.0, 16.0], dtype=torch.float64))
    inside = coverage(np.array([[5.0], [10.5], [11.5]]), x, r2, chunk_size=2, dtype=torch.float64)
    assert inside.tolist() == [True, True, False]  # 5 is within 2 of 3 (and 4 of 7); 10.5 within 4 of 7


def test_argument_checks():
    x = np.zeros((3, 2))
    with pytest.raises(ValueError, match="needs more than 3 reference images"):
        precision_recall(x, x, k=3)
    with pytest.raises(ValueError, match="feature sizes"):
        precision_recall(np.zeros((5, 2)), np.zeros((5, 3)), k=1)


def test_cli_on_feature_files(tmp_path, capsys):
    from fdistill.metrics.fid import save_stats, stats_from_features
    rng = np.random.default_rng(5)
    real = rng.normal(size=(120, 8)).astype(np.float32)
    fake = real[:40]
    for name, f in (("real", real), ("fake", fake)):
        save_stats(tmp_path / f"{name}.npz", *stats_from_features(f), features=f, mode="clean")
    out = tmp_path / "pr.json"
    assert eval_main(["pr", str(tmp_path / "fake.npz"), str(tmp_path / "real.npz"), "--num", "all",
                      "--device", "cpu", "--chunk-size", "16", "--out", str(out), "--quiet"]) == 0
    res = json.loads(out.read_text())
    assert res["precision"] == 1.0 and res["recall"] < 1.0
    assert res["protocol"]["k"] == 3 and res["protocol"]["num_gen"] == 40 and res["protocol"]["num_ref"] == 120
    # A statistics file without features is refused with a clear message, and so is a mode mismatch.
    save_stats(tmp_path / "nofeat.npz", *stats_from_features(real), mode="clean")
    capsys.readouterr()
    assert eval_main(["pr", str(tmp_path / "fake.npz"), str(tmp_path / "nofeat.npz"), "--num", "all",
                      "--device", "cpu", "--quiet"]) == 2
    assert "no features" in capsys.readouterr().err
    assert eval_main(["pr", str(tmp_path / "fake.npz"), str(tmp_path / "real.npz"), "--num", "all",
                      "--mode", "legacy_tensorflow", "--device", "cpu", "--quiet"]) == 2


def test_cli_takes_the_mode_recorded_with_the_features(tmp_path, capsys):
    from fdistill.metrics.fid import save_stats, stats_from_features
    rng = np.random.default_rng(6)
    f = rng.normal(size=(30, 4)).astype(np.float32)
    save_stats(tmp_path / "a.npz", *stats_from_features(f), features=f, mode="legacy_tensorflow")
    save_stats(tmp_path / "b.npz", *stats_from_features(f), features=f, mode="clean")
    assert eval_main(["pr", str(tmp_path / "a.npz"), str(tmp_path / "a.npz"), "--num", "all", "--device", "cpu",
                      "--quiet"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["protocol"]["mode"] == "legacy_tensorflow" and res["precision"] == 1.0
    assert eval_main(["pr", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--num", "all", "--device", "cpu",
                      "--quiet"]) == 2
    assert "different modes" in capsys.readouterr().err


def test_cli_reads_the_shipped_mnist_reference(tmp_path, capsys):
    """The demo's shipped reference (key ``features``, float16) serves as REF as it is: the demo's students are
    compared with `fdistill eval pr runs/demo_js/student_features.npz assets/mnist_teacher/ref_features.npz`."""
    from pathlib import Path
    ref = Path(__file__).resolve().parents[1] / "assets/mnist_teacher/ref_features.npz"
    with np.load(ref) as d:
        feats = d["features"].astype(np.float32)
    np.savez(tmp_path / "gen.npz", feats=feats[:50])
    out = tmp_path / "pr.json"
    assert eval_main(["pr", str(tmp_path / "gen.npz"), str(ref), "--num", "all", "--device", "cpu",
                      "--out", str(out), "--quiet"]) == 0
    res = json.loads(out.read_text())
    # the same figures as the features rewritten under the `feats` key, and 50 of its own points lie in its manifold
    np.savez(tmp_path / "ref.npz", feats=feats)
    assert eval_main(["pr", str(tmp_path / "gen.npz"), str(tmp_path / "ref.npz"), "--num", "all", "--device", "cpu",
                      "--out", str(tmp_path / "pr2.json"), "--quiet"]) == 0
    res2 = json.loads((tmp_path / "pr2.json").read_text())
    assert res["precision"] == res2["precision"] == 1.0 and res["recall"] == res2["recall"] < 1.0
    assert res["protocol"]["num_ref"] == 1000
