"""k-NN manifold metrics on constructed feature sets: identical, disjoint, and half the modes dropped."""

import pytest
import torch

import jumpflow.eval.manifold as manifold
from jumpflow.errors import JumpflowError
from jumpflow.eval import density_coverage, knn_radii, precision_recall

CENTRES = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [100.0, 100.0]])


def modes(n_per_mode, which, seed):
    """n_per_mode points N(c, I) around each chosen centre (far apart: balls never reach another mode)."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([CENTRES[i] + torch.randn(n_per_mode, 2, generator=g) for i in which])


def test_knn_radii_brute_force_and_chunks(monkeypatch):
    x = torch.randn(120, 5, generator=torch.Generator().manual_seed(0))
    d = torch.cdist(x.double(), x.double()) + torch.diag(torch.full((120,), float("inf"), dtype=torch.float64))
    expected = d.sort(dim=1).values[:, 2]  # third neighbour, the point itself excluded
    torch.testing.assert_close(knn_radii(x, 3), expected)
    monkeypatch.setattr(manifold, "_CHUNK_ELEMENTS", 7 * 120)  # blocks of 7 rows: the same radii
    torch.testing.assert_close(knn_radii(x.double(), 3), expected)


def test_identical_sets():
    x = modes(100, range(4), 1)
    assert precision_recall(x, x.clone(), k=3) == {"precision": 1.0, "recall": 1.0}
    out = density_coverage(x, x.clone(), k=5)
    assert out["coverage"] == 1.0
    # Each real ball holds its centre and exactly its k neighbours (no ties): density = (k + 1) / k.
    assert out["density"] == pytest.approx(6 / 5, abs=1e-12)


def test_disjoint_sets():
    real, fake = modes(100, [0], 2), modes(100, [3], 3)
    assert precision_recall(real, fake) == {"precision": 0.0, "recall": 0.0}
    assert density_coverage(real, fake) == {"density": 0.0, "coverage": 0.0}


def test_half_the_modes_dropped():
    real = modes(200, range(4), 4)
    fake = modes(200, [0, 1], 5)  # same law on two modes, nothing on the other two
    pr = precision_recall(real, fake, k=3)
    assert pr["precision"] > 0.95
    assert 0.45 < pr["recall"] <= 0.5
    dc = density_coverage(real, fake, k=5)
    assert 0.8 < dc["density"] < 1.2
    assert 0.45 < dc["coverage"] <= 0.5


def test_chunked_matches_one_block(monkeypatch):
    real, fake = modes(60, range(4), 6), modes(50, [0, 2], 7)
    whole = precision_recall(real, fake), density_coverage(real, fake)
    monkeypatch.setattr(manifold, "_CHUNK_ELEMENTS", 100)
    assert (precision_recall(real, fake), density_coverage(real, fake)) == whole


def test_clear_errors():
    x = torch.randn(10, 3)
    with pytest.raises(JumpflowError, match="k < 10"):
        precision_recall(x, x, k=10)
    with pytest.raises(JumpflowError, match="fake set"):
        precision_recall(x, x[:3], k=3)
    with pytest.raises(JumpflowError, match="positive integer"):
        density_coverage(x, x, k=0)
    with pytest.raises(JumpflowError, match="dimensions differ"):
        density_coverage(x, torch.randn(10, 4))
    with pytest.raises(JumpflowError, match=r"2-D \(N, D\)"):
        precision_recall(torch.randn(10, 1, 2, 2), x)
    with pytest.raises(JumpflowError, match="NaN"):
        precision_recall(x, torch.full((10, 3), float("nan")))
