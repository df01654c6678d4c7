"""Subprocess target of tests/test_precond.py: every preconditioner over sample-sharded rows (2 ranks, Gloo).

Usage: torchrun --standalone --nproc_per_node=2 -m tests._precond_dist_driver OUT_DIR
"""

import sys
from pathlib import Path

import torch

from reweight.distributed import DistributedObjective, init_distributed, shard_range
from reweight.precond import KFAC, PRECONDITIONERS
from tests.test_precond import _problem


def main(out: str) -> None:
    torch.set_num_threads(1)
    rank, world, _ = init_distributed("cpu")
    obj, X, y, alpha, W = _problem(n=130, seed=3)
    lo, hi = shard_range(obj.n, rank, world)
    dobj = DistributedObjective(X[lo:hi], y[lo:hi], obj.K, obj.lam, chunk_rows=20)
    H = dobj.hessian(W, alpha)
    B = torch.randn(obj.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    res = {"dense": H.dense()}
    M = KFAC(H)
    res["kfac_C"], res["kfac_A"] = M.C, M.A
    for k in ("auto", *PRECONDITIONERS):
        res[f"x_{k}"] = H.solve(B, method="cg", rtol=1e-12, max_iter=2000, precond=k).x
    torch.save(res, Path(out) / f"rank{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
