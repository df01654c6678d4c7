"""torch.distributed data parallelism of the head problem: a real 2-process torchrun (Gloo, CPU)
against the single-process hypergradient, plus in-process checks of the pieces."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.dist_hypergrad import DistConfig, _s_init, synthetic_rows
from reweight.distributed import (
    DistributedObjective,
    GatheredMethod,
    check_same_config,
    extract_features_distributed,
    fingerprint_mismatch,
    init_distributed,
    sampler_indices,
    shard_range,
)
from reweight.errors import ConfigError, DataError
from reweight.head import HeadObjective, add_bias, solve_head
from reweight.hypergrad import BilevelProblem, ConjugateGradient, Exact, hypergradient
from reweight.runs import load_checked
from reweight.weights import WeightModel

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["n=1500", "m=200", "d=8", "K=4", "lam=0.02", "dtype=float64", "chunk_rows=300", "rtol=1e-12", "grad_tol=1e-11"]


def _torchrun(tmp_path, extra, name):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "experiments.dist_hypergrad", *ARGS, f"out_dir={tmp_path}", f"name={name}", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


def _single_process_reference(cfg: DistConfig):
    """The plain in-memory problem of reweight.head / reweight.hypergrad on all rows (no distribution)."""
    X, y = synthetic_rows(cfg, 0, cfg.n)
    Xv, yv = synthetic_rows(cfg, 0, cfg.m, split="val")
    obj = HeadObjective(add_bias(X), y, cfg.K, cfg.lam)
    wm = WeightModel(y, cfg.K)
    s = _s_init(cfg, torch.float64)
    W = solve_head(obj, wm.alpha(s).detach(), grad_tol=1e-11).W
    return hypergradient(ConjugateGradient(rtol=1e-12, max_iter=2000), BilevelProblem(obj, add_bias(Xv), yv, wm), s, W), W


def test_torchrun_two_processes_match_single_process(tmp_path):
    out = _torchrun(tmp_path, [], "two")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    got = load_checked(tmp_path / "two" / "grad.pt")
    assert (tmp_path / "two" / "DONE").is_file()
    ref, W = _single_process_reference(DistConfig(n=1500, m=200, d=8, K=4, lam=0.02))
    rel = float((got["grad_s"] - ref.grad_s).norm() / ref.grad_s.norm())
    print(f"relative error 2 ranks vs 1 process: {rel:.2e}")
    assert rel < 1e-6, rel  # acceptance: the 2-rank hypergradient equals the 1-process one to 1e-6 relative
    torch.testing.assert_close(got["grad_s"], ref.grad_s, rtol=1e-6, atol=1e-6 * float(ref.grad_s.abs().max()))
    torch.testing.assert_close(got["W"], W, rtol=1e-7, atol=1e-9)


def test_torchrun_mismatched_configs_fail_clearly(tmp_path):
    out = _torchrun(tmp_path, ["debug_lam_rank=1"], "bad")
    assert out.returncode != 0
    assert "Ranks have mismatched configs: rank 1 differs from rank 0 in lam=0.03" in out.stdout + out.stderr
    assert not (tmp_path / "bad" / "DONE").exists()


# ---- in-process checks (world size 1, no process group) ------------------------------------


def test_old_tolerance_keys_are_read_at_their_new_place():
    from reweight.config import load_config

    with pytest.warns(DeprecationWarning, match=r"tol -> rtol, inner_tol -> grad_tol"):
        cfg = load_config(None, ["tol=1e-12", "inner_tol=1e-11"], cls=DistConfig)
    assert (cfg.rtol, cfg.grad_tol) == (1e-12, 1e-11)


def _small(seed=0, n=97, d=3, K=3):
    g = torch.Generator().manual_seed(seed)
    X = add_bias(torch.randn(n, d, generator=g, dtype=torch.float64))
    y = torch.arange(n) % K
    Xv = add_bias(torch.randn(30, d, generator=g, dtype=torch.float64))
    yv = torch.arange(30) % K
    return X, y, Xv, yv


def test_single_rank_objective_equals_head_objective():
    X, y, Xv, yv = _small()
    mem = HeadObjective(X, y, 3, 0.1)
    dobj = DistributedObjective(X, y, 3, 0.1, chunk_rows=20)
    wm = WeightModel(y, 3)
    s = torch.randn(97, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    alpha = wm.alpha(s).detach()
    W = solve_head(mem, alpha, grad_tol=1e-11).W
    torch.testing.assert_close(solve_head(dobj, alpha, grad_tol=1e-11).W, W)
    torch.testing.assert_close(dobj.grad(W, alpha), mem.grad(W, alpha))
    torch.testing.assert_close(dobj.loss(W, alpha), mem.loss(W, alpha))
    U = torch.randn_like(W)
    torch.testing.assert_close(dobj.hessian(W, alpha).matvec(U), mem.hessian(W, alpha).matvec(U))
    torch.testing.assert_close(dobj.hessian(W, alpha).dense(), mem.hessian(W, alpha).dense())
    for m in (ConjugateGradient(rtol=1e-12), Exact()):
        a = hypergradient(m, BilevelProblem(dobj, Xv, yv, wm), s, W)  # the sharded objective gathers itself
        b = hypergradient(m, BilevelProblem(mem, Xv, yv, wm), s, W)
        torch.testing.assert_close(a.grad_s, b.grad_s)
    with pytest.warns(DeprecationWarning, match="GatheredMethod is deprecated"):
        old = GatheredMethod(ConjugateGradient(rtol=1e-12), dobj)
    torch.testing.assert_close(hypergradient(old, BilevelProblem(dobj, Xv, yv, wm), s, W).grad_s, b.grad_s)


def test_gather_places_values_by_global_index():
    X, y, *_ = _small(n=10)
    perm = torch.tensor([3, 0, 9, 1, 2, 8, 4, 7, 6, 5])
    dobj = DistributedObjective(X[perm], y[perm], 3, 0.1, index=perm)
    torch.testing.assert_close(dobj.gather(perm.double()), torch.arange(10, dtype=torch.float64))
    with pytest.raises(DataError, match="Expected local values with 10 rows, but got 9"):
        dobj.gather(torch.zeros(9))
    with pytest.raises(DataError, match=r"Expected alpha of shape \(10,\) or \(10,\), but got \(4,\)"):
        dobj.check_alpha(torch.ones(4))


def test_shard_range_and_sampler_cover_every_sample_once():
    for n, world in [(10, 3), (7, 7), (1000, 4), (11, 2)]:
        ranges = [shard_range(n, r, world) for r in range(world)]
        assert [lo for lo, _ in ranges] == [0] + [hi for _, hi in ranges[:-1]] and ranges[-1][1] == n
        idx = sorted(int(i) for r in range(world) for i in sampler_indices(n, r, world))
        assert idx == list(range(n))  # DistributedSampler's padding duplicates are dropped
    with pytest.raises(ConfigError, match="The 'rank' parameter of shard_range must be in 0..1. Got 2 instead."):
        shard_range(10, 2, 2)
    with pytest.raises(ConfigError, match="The 'n' parameter of shard_range must be >= the world size 4. Got 3 instead."):
        shard_range(3, 0, 4)


def test_config_fingerprints():
    assert fingerprint_mismatch([{"lam": 0.1, "n": 5}, {"lam": 0.1, "n": 5}]) is None
    msg = fingerprint_mismatch([{"lam": 0.1, "n": 5}, {"lam": 0.1, "n": 5}, {"lam": 0.2, "n": 5}])
    assert msg == "rank 2 differs from rank 0 in lam=0.2 (rank 0: 0.1)"
    check_same_config({"anything": 1})  # no process group: nothing to compare, no error


def test_init_distributed_errors(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    assert init_distributed("cpu") == (0, 1, torch.device("cpu"))
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="Incomplete torch.distributed environment"):
        init_distributed("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="The 'device' parameter of init_distributed is 'cuda' but CUDA is not available"):
            init_distributed("cuda")


def test_distributed_objective_errors():
    X, y, *_ = _small(n=10)
    with pytest.raises(ConfigError, match="The 'n_global' parameter of ShardedRows is 12 but the ranks hold 10"):
        DistributedObjective(X, y, 3, 0.1, n_global=12)
    with pytest.raises(DataError, match=r"Expected an index of shape \(10,\)"):
        DistributedObjective(X, y, 3, 0.1, index=torch.arange(9))
    with pytest.raises(ConfigError, match="The 'lam' parameter of [A-Za-z]* must be a finite number > 0"):
        DistributedObjective(X, y, 3, -1.0)


def test_extract_features_distributed_single_rank(tmp_path):
    from tests.test_store import _TinyBackbone

    images = torch.rand(9, 1, 2, 2)
    st = extract_features_distributed(_TinyBackbone(), images, tmp_path, labels=torch.arange(9) % 3, shard_rows=4)
    assert st.root == tmp_path / "rank-00000" and st.shape == (9, 3)
    torch.testing.assert_close(st.extra("index"), torch.arange(9))
