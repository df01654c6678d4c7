"""One CG hypergradient of the head problem with samples sharded across torch.distributed ranks.

Launch with torchrun (Gloo on CPU, NCCL with ``device=cuda``)::

    torchrun --standalone --nproc_per_node=2 -m experiments.dist_hypergrad n=20000 d=64 K=10
    carrot dist_hypergrad n=2000          # the same code in one process

(``python -m experiments.dist_hypergrad`` is the one command line's ``carrot dist_hypergrad``; every
rank parses the same arguments.)

Every rank builds only its own rows of a synthetic problem (deterministic per row block, so the
data do not depend on the number of ranks) or reads its rows from a feature store
(``store=DIR``: a :class:`reweight.store.FeatureStore` with a ``labels`` extra). The inner head is
solved by Newton with all-reduced gradients/HVPs, then one CG hypergradient is computed, the
per-rank components are gathered and the weight chain rule applied. Rank 0 writes the run
directory ``runs/dist_hypergrad/<name>`` (config.yaml, env.json, summary.json, grad.pt, DONE).
Every rank checks that all ranks got the same config before any work.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Dict, Optional, Tuple

import torch

from reweight.config import help_field as _f
from reweight.config import to_dict
from reweight.errors import ConfigError
from reweight.seeding import torch_generator

from .study import Context, Study, shim

__all__ = ["DistConfig", "STUDY", "build_local_problem", "run", "synthetic_rows"]

BLOCK = 4096  # synthetic rows are generated in blocks with their own seed stream


@dataclass(frozen=True)
class DistConfig:
    """Config of the distributed hypergradient run (dotted overrides: ``key=value``)."""

    name: str = _f("default", "run name (directory under out_dir)")
    out_dir: str = _f("runs/dist_hypergrad", "parent directory of run directories")
    seed: int = _f(0, "root seed of the synthetic problem")
    n: int = _f(20000, "training samples (synthetic)")
    m: int = _f(500, "validation samples (replicated on every rank)")
    d: int = _f(64, "feature dimension (a bias column is appended)")
    K: int = _f(10, "classes")
    lam: float = _f(1e-2, "L2 strength lambda")
    dtype: str = _f("float64", "float32 or float64")
    device: str = _f("cpu", "cpu (Gloo) or cuda (NCCL, one GPU per rank)")
    chunk_rows: int = _f(65536, "rows per streamed chunk of the local shard")
    store: Optional[str] = _f(None, "feature store directory (rank-sharded rows read from it) instead of synthetic data")
    rtol: float = _f(1e-10, "CG relative residual of the hypergradient solve (formerly tol)")
    grad_tol: float = _f(1e-9, "Newton gradient-norm tolerance of the inner solve (formerly inner_tol)")
    write_grad: bool = _f(True, "save the (n,) hypergradient in grad.pt")
    debug_lam_rank: int = _f(-1, "testing only: this rank perturbs lam (to exercise the config check)")

    LEGACY_KEYS: ClassVar[Dict[str, str]] = {"tol": "rtol", "inner_tol": "grad_tol"}

    def __post_init__(self) -> None:
        for k in ("n", "m", "d", "K", "chunk_rows"):
            if getattr(self, k) < 1:
                raise ConfigError(f"The '{k}' parameter must be >= 1. Got {getattr(self, k)!r} instead.")
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"The 'dtype' parameter must be one of 'float32', 'float64'. Got {self.dtype!r} instead.")
        if not self.lam > 0:
            raise ConfigError(f"The 'lam' parameter must be > 0. Got {self.lam!r} instead.")


def _centers(cfg: DistConfig) -> torch.Tensor:
    return 1.5 * torch.randn(cfg.K, cfg.d, generator=torch_generator(cfg.seed, "centers"), dtype=torch.float64)


def synthetic_rows(cfg: DistConfig, lo: int, hi: int, split: str = "train") -> Tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[lo, hi)`` of the synthetic split: Gaussian classes, float64 ``(hi-lo, d)`` and labels.

    Each block of ``BLOCK`` rows has its own named seed stream, so a rank generates only its rows
    and the data are identical for any number of ranks.
    """
    C = _centers(cfg)
    xs, ys = [], []
    for b in range(lo // BLOCK, (hi - 1) // BLOCK + 1):
        g = torch_generator(cfg.seed, f"{split}-block-{b}")
        yb = torch.randint(0, cfg.K, (BLOCK,), generator=g)
        xb = C[yb] + torch.randn(BLOCK, cfg.d, generator=g, dtype=torch.float64) * 2.0
        s, e = max(lo, b * BLOCK) - b * BLOCK, min(hi, (b + 1) * BLOCK) - b * BLOCK
        xs.append(xb[s:e])
        ys.append(yb[s:e])
    return torch.cat(xs), torch.cat(ys)


def _all_labels(cfg: DistConfig) -> torch.Tensor:
    if cfg.store:
        from reweight.store import FeatureStore

        return FeatureStore(cfg.store).labels
    return torch.cat([synthetic_rows(cfg, lo, min(cfg.n, lo + BLOCK))[1] for lo in range(0, cfg.n, BLOCK)])


def _s_init(cfg: DistConfig, dtype: torch.dtype) -> torch.Tensor:
    """A non-uniform ``s`` (so the weights and the chain rule are exercised)."""
    from reweight.weights import initial_s

    return initial_s(cfg.n, dtype) + 0.5 * torch.randn(cfg.n, generator=torch_generator(cfg.seed, "s"), dtype=torch.float64).to(dtype)


def build_local_problem(cfg: DistConfig, rank: int, world: int, device: torch.device):
    """This rank's :class:`~reweight.distributed.DistributedObjective`, the replicated validation set,
    the weight model and ``s`` (global)."""
    from reweight.distributed import DistributedObjective, shard_range
    from reweight.head import add_bias
    from reweight.streaming import ChunkedFeatures
    from reweight.weights import WeightModel

    dtype = getattr(torch, cfg.dtype)
    lam = cfg.lam * (1.5 if rank == cfg.debug_lam_rank else 1.0)
    lo, hi = shard_range(cfg.n, rank, world)
    y_all = _all_labels(cfg)
    if cfg.store:
        from reweight.store import FeatureStore

        st = FeatureStore(cfg.store)
        if st.n != cfg.n:
            raise ConfigError(f"The 'n' parameter is {cfg.n} but the store {cfg.store!r} holds {st.n} rows.")
        X = ChunkedFeatures(_RowRange(st, lo, hi), cfg.chunk_rows, dtype=dtype, device=device, bias=True)
    else:
        Xl, _ = synthetic_rows(cfg, lo, hi)
        X = ChunkedFeatures(Xl.to(device, dtype), cfg.chunk_rows, dtype=dtype, device=device, bias=True)
    obj = DistributedObjective(X, y_all[lo:hi].to(device), cfg.K, lam, index=torch.arange(lo, hi), n_global=cfg.n)
    Xv, yv = synthetic_rows(cfg, 0, cfg.m, split="val")
    wm = WeightModel(y_all.to(device), cfg.K)
    return obj, add_bias(Xv.to(device, dtype)), yv.to(device), wm, _s_init(cfg, dtype).to(device)


class _RowRange:
    """Rows ``[lo, hi)`` of a feature store, chunked without loading the rest."""

    def __init__(self, store, lo: int, hi: int):
        self.store, self.lo, self.hi = store, lo, hi
        self.shape, self.dtype = (hi - lo, store.d), store.dtype

    def __getitem__(self, sl: slice) -> torch.Tensor:
        a, b = self.lo + (sl.start or 0), min(self.hi, self.lo + (sl.stop if sl.stop is not None else self.hi))
        parts = []
        for i in range(self.store.num_shards):
            s0, s1 = int(self.store.offsets[i]), int(self.store.offsets[i + 1])
            if s1 > a and s0 < b:
                parts.append(self.store.shard(i)[max(a, s0) - s0:min(b, s1) - s0])
        return torch.cat(parts)


def run(cfg: DistConfig) -> Optional[Dict[str, Any]]:
    """Run on this rank; rank 0 returns (and writes) the summary, other ranks return None."""
    from reweight.distributed import check_same_config, init_distributed
    from reweight.head import solve_head
    from reweight.hypergrad import BilevelProblem, ConjugateGradient, hypergradient

    rank, world, device = init_distributed(cfg.device)
    torch.manual_seed(cfg.seed)
    fp = {k: v for k, v in to_dict(cfg).items() if k not in ("debug_lam_rank",)}
    fp["lam"] = cfg.lam * (1.5 if rank == cfg.debug_lam_rank else 1.0)
    check_same_config(fp)
    t0 = time.perf_counter()
    obj, Xv, yv, wm, s = build_local_problem(cfg, rank, world, device)
    t_build = time.perf_counter() - t0
    alpha = wm.alpha(s).detach()
    t0 = time.perf_counter()
    sol = solve_head(obj, alpha, grad_tol=cfg.grad_tol, max_iter=100)
    t_inner = time.perf_counter() - t0
    problem = BilevelProblem(obj, Xv, yv, wm)
    t0 = time.perf_counter()
    hg = hypergradient(ConjugateGradient(rtol=cfg.rtol, max_iter=2000), problem, s, sol.W)
    t_hyper = time.perf_counter() - t0
    if rank != 0:
        return None
    from reweight.runs import RunDir, save_checked

    rd = RunDir(Path(cfg.out_dir) / cfg.name, cfg, overwrite=True)
    rd.write_env(cfg.seed, str(device))
    if cfg.write_grad:
        save_checked(rd.file("grad.pt"), {"grad_s": hg.grad_s.cpu(), "grad_alpha": hg.grad_alpha.cpu(), "W": sol.W.cpu(),
                                          "v": hg.v.cpu()})
    summary = {
        "world_size": world, "backend": "nccl" if device.type == "cuda" else "gloo", "n": cfg.n, "d": cfg.d, "K": cfg.K,
        "newton_iters": sol.iters, "inner_converged": sol.converged, "cg_hvps": hg.hvps, "cg_rel_residual": hg.rel_residual,
        "val_loss": hg.val_loss, "grad_s_norm": float(hg.grad_s.norm()),
        "seconds": {"build": t_build, "inner": t_inner, "hypergradient": t_hyper},
    }
    rd.finish(summary)
    return summary


def _run(cfg: DistConfig, ctx: Context) -> Optional[Dict[str, Any]]:
    try:
        return run(cfg)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _report(summary: Optional[Dict[str, Any]]) -> str:
    return "" if summary is None else json.dumps(summary, indent=2, sort_keys=True)


STUDY = Study(name="dist_hypergrad", summary="one CG hypergradient with samples sharded across torch.distributed ranks",
              config=DistConfig, run=_run, report=_report, quick=("n=2000", "m=200"), threads_key=None,
              description=__doc__ or "")

if __name__ == "__main__":
    shim("dist_hypergrad")
