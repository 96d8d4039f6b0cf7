"""Frechet distance against scipy's sqrtm, a Gaussian closed form, and its .npz statistics round trip."""

import numpy as np
import pytest
import torch

from jumpflow.errors import JumpflowError
from jumpflow.eval import (feature_statistics, frechet_distance, frechet_distance_from_features, load_statistics,
                           save_statistics)


def correlated(n, d, seed, shift=0.0):
    """n points of a random correlated Gaussian in R^d (a random linear map of standard normals)."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix + shift + rng.normal(size=d)


def scipy_frechet(mu1, s1, mu2, s2):
    linalg = pytest.importorskip("scipy.linalg")
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_feature_statistics_match_numpy():
    x = correlated(200, 8, 0)
    mu, sigma = feature_statistics(torch.from_numpy(x).float())
    assert mu.dtype == sigma.dtype == np.float64 and mu.shape == (8,) and sigma.shape == (8, 8)
    np.testing.assert_allclose(mu, x.astype(np.float32).mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float32), rowvar=False), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("d", [16, 64])
def test_matches_scipy_sqrtm(d):
    a, b = correlated(500, d, 1), correlated(400, d, 2, shift=0.3)
    stats_a, stats_b = feature_statistics(a), feature_statistics(b)
    ours = frechet_distance(*stats_a, *stats_b)
    assert ours == pytest.approx(scipy_frechet(*stats_a, *stats_b), rel=1e-6)
    assert frechet_distance_from_features(a, b) == pytest.approx(ours, rel=1e-12)


def test_same_set_is_zero():
    x = correlated(300, 32, 3)
    assert abs(frechet_distance_from_features(x, x)) < 1e-8
    # Fewer samples than dimensions: a singular covariance must still give ~0, not NaN.
    small = correlated(10, 32, 4)
    assert abs(frechet_distance_from_features(small, small)) < 1e-8


def test_diagonal_gaussians_closed_form():
    # Diagonal covariances commute: FD = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.default_rng(5)
    mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
    a, b = rng.uniform(0.1, 3, size=10), rng.uniform(0.1, 3, size=10)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # Symmetric in its two arguments.
    assert frechet_distance(mu2, np.diag(b), mu1, np.diag(a)) == pytest.approx(expected, rel=1e-10)


def test_clear_errors():
    with pytest.raises(JumpflowError, match="at least 2"):
        feature_statistics(np.zeros((1, 4)))
    with pytest.raises(JumpflowError, match="2-D"):
        feature_statistics(np.zeros((5, 2, 2)))
    with pytest.raises(JumpflowError, match="NaN"):
        feature_statistics(np.array([[0.0, 1.0], [np.nan, 2.0]]))
    with pytest.raises(JumpflowError, match="dimensions differ"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(JumpflowError, match=r"\(D, D\)"):
        frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))


def test_statistics_round_trip(tmp_path):
    mu, sigma = feature_statistics(correlated(50, 6, 6))
    path = tmp_path / "ref_stats.npz"
    save_statistics(path, mu, sigma)
    mu2, sigma2 = load_statistics(path)
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    # A name without the .npz suffix is kept as given.
    save_statistics(tmp_path / "plain", mu, sigma)
    assert (tmp_path / "plain").is_file() and not (tmp_path / "plain.npz").exists()


def test_bad_statistics_files(tmp_path):
    with pytest.raises(JumpflowError, match="not found"):
        load_statistics(tmp_path / "missing.npz")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(JumpflowError, match="corrupt.npz"):
        load_statistics(corrupt)
    text = tmp_path / "text.npz"
    text.write_text("mu, sigma")
    with pytest.raises(JumpflowError, match="not a readable"):
        load_statistics(text)
    wrong_keys = tmp_path / "wrong.npz"
    np.savez(wrong_keys, mean=np.zeros(3), cov=np.eye(3))
    with pytest.raises(JumpflowError, match="missing"):
        load_statistics(wrong_keys)
    bare = tmp_path / "bare.npy"
    np.save(bare, np.zeros(3))
    with pytest.raises(JumpflowError, match="single array"):
        load_statistics(bare)
