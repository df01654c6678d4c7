"""Chunked feature store: round trip, atomic/complete writes, and clear errors on bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from reweight.errors import ConfigError, DataError
from reweight.store import MANIFEST, FeatureStore, StoreWriter, check_fits_in_memory, extract_features_to_store, write_store


def _data(n=37, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, 3, (n,), generator=g)


def _files(root):
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_round_trip_and_chunks(tmp_path):
    X, y = _data()
    st = write_store(tmp_path / "s", X, y, shard_rows=10)
    assert st.shape == (37, 5) and st.num_shards == 4 and st.dtype == torch.float32
    st = FeatureStore(tmp_path / "s", verify=True)
    torch.testing.assert_close(st.to_tensor(), X, rtol=0, atol=0)
    torch.testing.assert_close(st.labels, y, rtol=0, atol=0)
    chunks = list(st.chunks(4))
    assert all(hi - lo <= 4 for lo, hi, _ in chunks)
    assert [lo for lo, _, _ in chunks][:4] == [0, 4, 8, 10]  # chunks never span two shards
    torch.testing.assert_close(torch.cat([c for _, _, c in chunks]), X, rtol=0, atol=0)
    assert sum(hi - lo for lo, hi, _ in chunks) == 37
    assert _files(tmp_path / "s") == sorted([MANIFEST, "labels.npy"] + [f"shard_0000{i}.npy" for i in range(4)])


def test_writer_buffers_uneven_blocks_and_float64(tmp_path):
    X, y = _data(n=50, d=3)
    X = X.double()
    with StoreWriter(tmp_path / "s", 3, shard_rows=16, dtype="float64") as w:
        for lo, hi in [(0, 7), (7, 30), (30, 31), (31, 50)]:
            w.append(X[lo:hi], labels=y[lo:hi])
    st = FeatureStore(tmp_path / "s")
    assert [s.rows for s in st.shards] == [16, 16, 16, 2] and st.dtype == torch.float64
    torch.testing.assert_close(st.to_tensor(), X, rtol=0, atol=0)


def test_chunk_size_zero_is_an_error(tmp_path):
    st = write_store(tmp_path / "s", *_data())
    with pytest.raises(ConfigError, match="The 'chunk_rows' parameter of FeatureStore.chunks must be an int >= 1. Got 0 instead."):
        next(st.chunks(0))
    with pytest.raises(ConfigError, match="The 'chunk_rows' parameter of StoreWriter must be an int >= 1"):
        StoreWriter(tmp_path / "t", 3, shard_rows=0)
    assert not (tmp_path / "t").exists() or _files(tmp_path / "t") == []


def test_missing_shard_is_an_error(tmp_path):
    write_store(tmp_path / "s", *_data(), shard_rows=10)
    (tmp_path / "s" / "shard_00002.npy").unlink()
    with pytest.raises(DataError, match="Shard 'shard_00002.npy' of the store .* is missing"):
        FeatureStore(tmp_path / "s")


def test_wrong_shape_shard_is_an_error(tmp_path):
    write_store(tmp_path / "s", *_data(), shard_rows=10)
    np.save(tmp_path / "s" / "shard_00001.npy", np.zeros((10, 4), dtype=np.float32))
    with pytest.raises(DataError, match=r"has shape \(10, 4\) and dtype float32, but the manifest says \(10, 5\)"):
        FeatureStore(tmp_path / "s")


def test_corrupted_shard_fails_verification(tmp_path):
    write_store(tmp_path / "s", *_data(), shard_rows=10)
    p = tmp_path / "s" / "shard_00000.npy"
    a = np.load(p)
    a[0, 0] += 1.0
    np.save(p, a)  # same shape and dtype: only the checksum catches it
    FeatureStore(tmp_path / "s")
    with pytest.raises(DataError, match="is corrupted \\(checksum mismatch\\)"):
        FeatureStore(tmp_path / "s", verify=True)


def test_incomplete_store_without_manifest_is_an_error(tmp_path):
    (tmp_path / "s").mkdir()
    with pytest.raises(DataError, match="manifest.json is missing"):
        FeatureStore(tmp_path / "s")


def test_error_inside_writer_leaves_no_partial_files(tmp_path):
    X, y = _data(n=40)
    with pytest.raises(RuntimeError, match="boom"):
        with StoreWriter(tmp_path / "s", 5, shard_rows=8) as w:
            w.append(X[:30], labels=y[:30])  # three shards already written
            assert len(_files(tmp_path / "s")) == 3
            raise RuntimeError("boom")
    assert _files(tmp_path / "s") == []


def test_bad_rows_are_rejected_and_clean_up(tmp_path):
    X, y = _data(n=40)
    bad = X.clone()
    bad[25, 1] = float("nan")
    with pytest.raises(DataError, match=r"contain NaN/Inf; first offending rows of this block: \[25\]"):
        with StoreWriter(tmp_path / "s", 5, shard_rows=8) as w:
            w.append(X[:20])
            w.append(bad)
    assert _files(tmp_path / "s") == []
    with pytest.raises(DataError, match=r"Expected rows of shape \(b, 5\), but got shape \(3, 4\)"):
        with StoreWriter(tmp_path / "t", 5) as w:
            w.append(torch.zeros(3, 4))
    assert _files(tmp_path / "t") == []


def test_existing_store_needs_overwrite(tmp_path):
    write_store(tmp_path / "s", *_data())
    with pytest.raises(ConfigError, match="already holds a store. Pass overwrite=True"):
        write_store(tmp_path / "s", *_data())
    st = write_store(tmp_path / "s", *_data(n=12, seed=1), shard_rows=5, overwrite=True)
    assert st.shape == (12, 5) and _files(tmp_path / "s") == sorted([MANIFEST, "labels.npy"] + [f"shard_0000{i}.npy" for i in range(3)])


def test_features_that_do_not_fit_without_store(tmp_path):
    with pytest.raises(ConfigError, match=r"need 3.81 GiB, more than the in-memory budget of 1.00 GiB, and no store is configured"):
        check_fits_in_memory((1_000_000, 1024), torch.float32, budget_bytes=2**30)
    assert check_fits_in_memory((10, 10), torch.float64, budget_bytes=2**30) == 800
    st = write_store(tmp_path / "s", *_data())
    with pytest.raises(ConfigError, match="no store is configured"):
        st.to_tensor(budget_bytes=100)


class _TinyBackbone(torch.nn.Module):
    """The two methods of a timm model that feature extraction uses (fast; no timm needed)."""

    def __init__(self, fail_after=None):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.calls, self.fail_after = 0, fail_after

    def forward_features(self, x):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("backbone failed")
        return self.lin(x.flatten(1))

    def forward_head(self, f, pre_logits=False):
        return f


def test_extract_features_to_store(tmp_path):
    torch.manual_seed(0)
    images = torch.rand(23, 1, 2, 2)
    labels = torch.arange(23) % 3
    model = _TinyBackbone()
    st = extract_features_to_store(model, images, tmp_path / "s", labels=labels, shard_rows=10, batch_size=4)
    with torch.no_grad():
        expected = model.lin(images.flatten(1))
    torch.testing.assert_close(st.to_tensor(), expected)
    torch.testing.assert_close(st.extra("index"), torch.arange(23))
    torch.testing.assert_close(st.labels, labels)
    assert json.loads((tmp_path / "s" / MANIFEST).read_text())["n"] == 23


def test_extraction_failure_leaves_no_shards(tmp_path):
    images = torch.rand(23, 1, 2, 2)
    with pytest.raises(RuntimeError, match="backbone failed"):
        extract_features_to_store(_TinyBackbone(fail_after=4), images, tmp_path / "s", shard_rows=10, batch_size=4)
    assert _files(tmp_path / "s") == []
