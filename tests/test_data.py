"""Embedded data, deterministic stratified splits, corruptions and their ground-truth masks."""

import numpy as np
import pytest
import torch

from reweight.data import (
    asymmetric_noise,
    check_features,
    check_labels,
    check_splits,
    load_dataset,
    longtail_imbalance,
    make_splits,
    prepare_data,
    symmetric_noise,
)
from reweight.errors import DataError


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_embedded_datasets_load():
    d = load_dataset("digits")
    assert d.images.shape == (1797, 1, 8, 8) and d.num_classes == 10 and d.images.max() <= 1.0
    m = load_dataset("mnist5k")
    assert m.images.shape == (5000, 1, 28, 28) and np.bincount(m.labels).min() >= 400
    with pytest.raises(DataError, match="Unknown dataset 'cifar'"):
        load_dataset("cifar")


def test_splits_stratified_disjoint_deterministic(digits):
    a = make_splits(digits.labels, 0.1, 0.2, seed=3)
    b = make_splits(digits.labels, 0.1, 0.2, seed=3)
    c = make_splits(digits.labels, 0.1, 0.2, seed=4)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["val"], c["val"])
    assert sum(len(v) for v in a.values()) == digits.labels.size
    check_splits(a, digits.labels.size)
    for k, frac in (("val", 0.1), ("test", 0.2)):
        counts = np.bincount(digits.labels[a[k]], minlength=10)
        expected = frac * np.bincount(digits.labels)
        assert np.all(np.abs(counts - expected) <= 1.01)


def test_symmetric_noise_rate_and_mask():
    y = np.repeat(np.arange(5), 100)
    c = symmetric_noise(y, 0.3, 5, np.random.default_rng(0))
    assert c.corrupted.sum() == 150
    np.testing.assert_array_equal(c.corrupted, c.labels != y)
    assert set(np.unique(c.labels[c.corrupted] - y[c.corrupted]) % 5) <= {1, 2, 3, 4}
    flipped_to = np.bincount(c.labels[c.corrupted], minlength=5)
    assert flipped_to.min() > 15  # spread over the other classes


def test_asymmetric_noise_follows_mapping():
    y = np.repeat(np.arange(4), 50)
    c = asymmetric_noise(y, 0.4, 4, np.random.default_rng(0))
    assert c.corrupted.sum() == 80
    np.testing.assert_array_equal(c.labels[c.corrupted], (y[c.corrupted] + 1) % 4)
    c2 = asymmetric_noise(y, 0.2, 4, np.random.default_rng(0), mapping=[1, 0, 3, 2])
    np.testing.assert_array_equal(c2.labels[c2.corrupted], np.array([1, 0, 3, 2])[y[c2.corrupted]])
    with pytest.raises(DataError, match="class mapping"):
        asymmetric_noise(y, 0.2, 4, np.random.default_rng(0), mapping=[1, 0])


def test_longtail_counts_follow_factor():
    y = np.repeat(np.arange(5), 200)
    c = longtail_imbalance(y, 10.0, 5, np.random.default_rng(0))
    counts = np.bincount(c.labels)
    assert counts[0] == 200 and counts[-1] == 20
    assert np.all(np.diff(counts) < 0) and not c.corrupted.any()
    np.testing.assert_array_equal(c.labels, y[c.keep])


def test_prepare_data_keeps_val_and_test_clean(digits):
    sp = prepare_data(digits, 0.1, 0.2, "symmetric", 0.4, 1.0, seed=0)
    assert abs(sp.corrupted.mean() - 0.4) < 0.01
    np.testing.assert_array_equal(sp.train_clean_labels, digits.labels[sp.train])
    np.testing.assert_array_equal(sp.corrupted, sp.train_labels != sp.train_clean_labels)
    check_splits({"train": sp.train, "val": sp.val, "test": sp.test}, digits.labels.size)
    imb = prepare_data(digits, 0.1, 0.2, "asymmetric", 0.2, 10.0, seed=0)
    assert np.bincount(imb.train_clean_labels).max() / np.bincount(imb.train_clean_labels).min() >= 8


def test_validation_errors():
    with pytest.raises(DataError, match=r"NaN/Inf in 1 row\(s\); first offending rows: \[2\]"):
        check_features(torch.tensor([[0.0], [1.0], [float("inf")]]))
    with pytest.raises(DataError, match="shape"):
        check_features(torch.zeros(3))
    with pytest.raises(DataError, match="5 columns"):
        check_features(torch.zeros(3, 4), dim=5)
    with pytest.raises(DataError, match="out of range at indices \\[1\\]"):
        check_labels(torch.tensor([0, 7, 1]), 3)
    with pytest.raises(DataError, match="Class\\(es\\) \\[2\\] have no sample in validation labels"):
        check_labels(torch.tensor([0, 1, 1]), 3, "validation labels")
    with pytest.raises(DataError, match="both split 'train' and split 'test'"):
        check_splits({"train": np.array([0, 1]), "test": np.array([1, 2])})
    with pytest.raises(DataError, match="duplicated"):
        check_splits({"train": np.array([0, 0])})
    with pytest.raises(DataError, match="rate"):
        symmetric_noise(np.array([0, 1]), 1.0, 2, np.random.default_rng(0))
    with pytest.raises(DataError, match="factor"):
        longtail_imbalance(np.array([0, 1]), 0.5, 2, np.random.default_rng(0))


def test_trusted_subsets_are_stratified_nested_and_seeded():
    from reweight.data import stratified_sizes, trusted_subset

    labels = np.repeat(np.arange(4), [40, 30, 20, 10])
    s = stratified_sizes(np.bincount(labels), 20)
    assert s.sum() == 20 and (s >= 1).all() and list(s) == [8, 6, 4, 2]  # proportional to 40:30:20:10
    small, big = trusted_subset(labels, 20, seed=3), trusted_subset(labels, 60, seed=3)
    assert set(small) <= set(big)  # nested: the smaller trusted set lies inside the larger one
    assert np.array_equal(np.bincount(labels[small], minlength=4), s)
    assert not np.array_equal(trusted_subset(labels, 20, seed=4), small)
    with pytest.raises(DataError, match="needs between 4 .* and 100"):
        trusted_subset(labels, 3, seed=0)


def test_meta_split_holds_out_every_class_and_keeps_some_in_meta_train():
    from reweight.data import meta_split

    labels = np.repeat(np.arange(3), [2, 5, 1])
    mask = meta_split(labels, 0.5, seed=0)
    for c, n_c in enumerate([2, 5, 1]):
        held = int(mask[labels == c].sum())
        assert (1 <= held <= n_c - 1) if n_c >= 2 else held == 0
    assert not meta_split(labels, 0.0, seed=0).any()


def test_prepare_data_trusted_size_keeps_the_training_split():
    from reweight.data import load_dataset, prepare_data

    ds = load_dataset("digits")
    a = prepare_data(ds, 0.2, 0.2, "symmetric", 0.4, 1.0, seed=0, trusted_size=50, meta_val_fraction=0.5)
    b = prepare_data(ds, 0.2, 0.2, "symmetric", 0.4, 1.0, seed=0, trusted_size=200)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.train_labels, b.train_labels)
    assert a.val.size == 50 and set(a.val) <= set(b.val) and a.meta_val.sum() > 0 and (~a.meta_val).sum() > 0
    with pytest.raises(DataError, match="at most the clean pool"):
        prepare_data(ds, 0.2, 0.2, "none", 0.0, 1.0, seed=0, trusted_size=10_000)
