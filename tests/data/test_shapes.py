"""The procedural shapes dataset (its latent factors checked against the pixels), its feature net, and hflip."""

import math

import pytest
import torch

from jumpflow import data
from jumpflow.data.shapes import SHAPE_NAMES
from jumpflow.errors import JumpflowError
from jumpflow.eval import feature_nets as fn

AREA = {  # exact area over r**2 of each shape of radius r (see data/shapes.py for what r means per shape)
    "square": 4.0, "circle": math.pi, "triangle": 3 * math.sqrt(3) / 4,
    "cross": 2 * (2 * 2 / 3) - (2 / 3) ** 2,  # two 2r x 2r/3 bars minus their shared 2r/3 square
}


@pytest.fixture(scope="module")
def small():
    return data.load("shapes", n=800, n_test=200)


def coverage(ds, images, factors):
    """Per-pixel coverage (N, H, W) recovered from the pixels: image = 2 * coverage * colour - 1 on black."""
    return ((images + 1) / 2 / factors["colour"][:, :, None, None]).mean(1)


def test_shapes_dtype_range_and_metadata(small):
    assert small.train.shape == (800, 3, 32, 32) and small.test.shape == (200, 3, 32, 32)
    assert small.train.dtype == torch.float32 and small.kind == "image" and small.shape == (3, 32, 32)
    assert small.train.min() >= -1 and small.train.max() <= 1
    assert small.train.min() == -1  # the black background
    assert small.num_classes == 4 and small.class_names == list(SHAPE_NAMES)
    assert small.train_labels.dtype == torch.int64 and small.test_labels.shape == (200,)
    for factors, count in ((small.factors, 800), (small.test_factors, 200)):
        assert factors["colour"].shape == (count, 3) and factors["size"].shape == (count,)
        assert factors["position"].shape == (count, 2)


def test_labels_are_balanced_in_both_splits(small):
    assert torch.bincount(small.train_labels).tolist() == [200] * 4
    assert torch.bincount(small.test_labels).tolist() == [50] * 4
    odd = data.load("shapes", n=10, n_test=3)
    assert torch.bincount(odd.train_labels, minlength=4).tolist() == [3, 3, 2, 2]


def test_deterministic_per_seed_and_seeds_differ(small):
    again = data.load("shapes", n=800, n_test=200)
    assert torch.equal(small.train, again.train) and torch.equal(small.test, again.test)
    assert torch.equal(small.train_labels, again.train_labels)
    other = data.load("shapes", n=800, n_test=200, seed=1)
    assert not torch.equal(small.train, other.train) and not torch.equal(small.test, other.test)


def test_test_split_is_fixed_and_apart_from_training(small):
    # the test set comes from its own stream: it does not move when n changes, and repeats no training image
    bigger = data.load("shapes", n=1000, n_test=200)
    assert torch.equal(bigger.test, small.test)
    distance = torch.cdist(small.test.flatten(1), small.train.flatten(1)).min()
    assert distance > 1.0


def test_position_factor_is_the_centre_of_mass(small):
    cov = coverage(small, small.train, small.factors)
    centres = torch.arange(32) + 0.5
    mass = cov.sum((1, 2))
    x = (cov * centres[None, None, :]).sum((1, 2)) / mass
    y = (cov * centres[None, :, None]).sum((1, 2)) / mass
    error = (torch.stack([x, y], 1) - small.factors["position"]).abs()
    assert error.max() < 0.1  # measured 0.067 px (triangles: the box filter's corners), 0.02 for squares


def test_colour_and_size_factors_match_the_pixels(small):
    # every shape has fully covered pixels, whose value is exactly its colour
    brightest = (small.train + 1) / 2
    assert torch.allclose(brightest.amax((2, 3)), small.factors["colour"], atol=1e-5)
    # the summed coverage is the shape's area (the box filter conserves area up to corner effects)
    mass = coverage(small, small.train, small.factors).sum((1, 2))
    for k, name in enumerate(SHAPE_NAMES):
        pick = small.train_labels == k
        expected = AREA[name] * small.factors["size"][pick] ** 2
        assert ((mass[pick] - expected).abs() / expected).max() < 0.04, name  # measured <= 2.6% (triangles)
    lo, hi = small.factors["size"].min(), small.factors["size"].max()
    assert 0.15 * 32 <= lo and hi <= 0.3 * 32


def test_shapes_stay_inside_the_image(small):
    cov = coverage(small, small.train, small.factors)
    border = torch.cat([cov[:, 0], cov[:, -1], cov[:, :, 0], cov[:, :, -1]], 1)
    assert border.max() < 0.5  # at most the anti-aliased fringe touches the edge, never the shape itself


def test_size_option():
    ds = data.load("shapes", n=40, n_test=8, size=16)
    assert ds.train.shape == (40, 3, 16, 16) and ds.test.shape == (8, 3, 16, 16)
    assert (ds.factors["size"] <= 0.3 * 16).all() and (ds.factors["position"] < 16).all()


@pytest.mark.parametrize("options, words", [
    ({"size": 4}, "size must be an integer in [8, 256]"), ({"size": 16.5}, "size"), ({"n": 0}, "n must be"),
    ({"n_test": -1}, "n_test"), ({"seed": "a"}, "seed"), ({"n": True}, "n must be"),
    ({"colour": "red"}, "valid options: n, n_test, size, seed, hflip"), ({"hflip": "yes"}, "hflip must be"),
])
def test_bad_options_are_clear_errors(options, words):
    with pytest.raises(JumpflowError, match="shapes|hflip") as e:
        data.load("shapes", **{"n": 8, "n_test": 4, **options})
    assert words in str(e.value)


def test_feature_net_classifies_shapes():
    """The dataset's feature net (eval/feature_nets.py, with the recipe shapes ask for) learns the classes."""
    ds = data.load("shapes", n=2000, n_test=400, size=16)
    recipe = fn.default_recipe(ds)
    assert (recipe.epochs, recipe.widths) == (12, (16, 32))
    net = fn.feature_net_for(ds)
    assert net.test_accuracy > 0.95  # measured 1.0 (400 test images), ~7 s on one thread
    # at the default size (10000 images, 32x32) the recipe is 3 epochs: measured test accuracy 1.0 in 43 s
    assert fn.default_recipe(data.load("shapes", n=10000, n_test=1)).epochs == 3


def test_other_datasets_keep_the_default_feature_net_recipe():
    # their cached feature nets are keyed by the recipe: it must not change under them
    assert fn.default_recipe(data.load("digits")) == fn.FeatureNetRecipe()


# --- horizontal flips (any finite image dataset, via load(..., hflip=True)) -------------------------------------

def draw(ds, n=4000, seed=3):
    return ds.sample_batch(n, torch.Generator().manual_seed(seed))


def test_hflip_is_off_by_default(small):
    assert small.hflip is False
    x, labels = draw(small, 500)
    idx = torch.randint(0, 800, (500,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(x, small.train[idx]) and torch.equal(labels, small.train_labels[idx])


def test_hflip_mirrors_half_of_the_draws(small):
    flipped_ds = data.load("shapes", n=800, n_test=200, hflip=True)
    plain, labels = draw(small)
    flipped, flipped_labels = draw(flipped_ds)
    assert torch.equal(labels, flipped_labels)  # same images drawn: the flips come after the indices
    same = (flipped == plain).flatten(1).all(1)
    mirrored = (flipped == plain.flip(-1)).flatten(1).all(1)
    assert (same ^ mirrored).all()  # each draw is the image or its exact mirror, never both (no symmetric images)
    assert abs(mirrored.double().mean().item() - 0.5) < 0.04  # 4000 draws: 4 standard deviations is 0.032
    again, _ = draw(flipped_ds)
    assert torch.equal(flipped, again)  # seeded by the caller's generator
    assert torch.equal(flipped_ds.test, small.test)  # held-out images are never flipped


def test_hflip_on_other_image_data_and_refused_for_vectors():
    digits = data.load("digits", hflip=True)
    x, _ = draw(digits, 2000)
    idx = torch.randint(0, len(digits.train), (2000,), generator=torch.Generator().manual_seed(3))
    mirrored = (x == digits.train[idx].flip(-1)).flatten(1).all(1) & (x != digits.train[idx]).flatten(1).any(1)
    assert 0.4 < mirrored.double().mean() < 0.6
    with pytest.raises(JumpflowError, match="hflip mirrors images.*checkerboard"):
        data.load("checkerboard", hflip=True)
