r"""Data parallelism for the head problem with ``torch.distributed`` (Gloo on CPU, NCCL on GPU).

Samples are sharded across ranks; every sum over samples in DESIGN section 2 becomes a local sum
followed by an all-reduce, with the global ``n`` in the ``1/n``:

.. math::

    F = \frac1n \sum_{r}\sum_{i\in r} \alpha_i\ell_i + \frac\lambda2\|W\|^2,\quad
    \nabla_W F = \frac1n \operatorname{allreduce}_r\Big(\sum_{i\in r}\alpha_i g_i h_i^\top\Big) + \lambda W,\quad
    HU = \frac1n \operatorname{allreduce}_r\Big(\sum_{i\in r} M_i^\top h_i\Big) + \lambda U.

After each all-reduce every rank holds the same tensor, so Newton (:func:`reweight.head.solve_head`)
and conjugate gradients (:meth:`reweight.head.HeadHessian.solve`) run identically on every rank:
same iterates, same stopping decisions, no extra synchronisation. The per-sample hypergradient
components :math:`\partial L_{val}/\partial\alpha_i = -\frac1n g_i^\top V h_i` are computed where the
samples live and gathered (:meth:`DistributedObjective.gather`); the chain through the weight
parameterisation runs on the gathered ``(n,)`` vector (``n`` floats, cheap).

The objective is :class:`~reweight.head.HeadObjective` itself over :class:`ShardedRows` (a row source
whose sums are all-reduced and whose per-sample values are gathered), so the head solver,
:class:`~reweight.hypergrad.BilevelProblem`, every registered hypergradient method and
:func:`~reweight.hypergrad.hypergradient` run unchanged; :class:`DistributedObjective` is its
historical constructor. The validation split is small and replicated on every rank.

Launch (one node, 2 CPU processes)::

    torchrun --standalone --nproc_per_node=2 -m experiments.dist_hypergrad

See ``docs/scale.md`` for clusters (multi-node ``torchrun --nnodes ... --rdzv-endpoint ...``).

References:
    Li et al., "PyTorch Distributed: Experiences on Accelerating Data Parallel Training", VLDB 2020.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .errors import ConfigError, DataError
from .head import HeadHessian, HeadObjective
from .rows import ChunkedFeatures, RowSource
from .validate import check_lam

__all__ = [
    "DistributedHessian",
    "DistributedObjective",
    "GatheredMethod",
    "ShardedRows",
    "backend_for",
    "check_same_config",
    "extract_features_distributed",
    "fingerprint_mismatch",
    "init_distributed",
    "rank_and_world",
    "sampler_indices",
    "shard_range",
]

log = logging.getLogger(__name__)


def _dist():
    import torch.distributed as dist

    return dist


def _active() -> bool:
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> Tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without an initialised process group."""
    if not _active():
        return 0, 1
    dist = _dist()
    return dist.get_rank(), dist.get_world_size()


def backend_for(device: str | torch.device) -> str:
    """``nccl`` for CUDA devices, ``gloo`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_distributed(device: str = "cpu", timeout_s: float = 300.0) -> Tuple[int, int, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment.

    With ``device="cuda"`` each process takes ``cuda:$LOCAL_RANK`` and the NCCL backend; on CPU Gloo.
    Without torchrun's variables (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) the
    process runs alone (world size 1, no process group): the same code then runs single-process.

    Returns:
        ``(rank, world_size, device)``.

    Raises:
        ConfigError: for a CUDA device when CUDA is not available, or a partial torchrun environment.
    """
    import datetime

    dist = _dist()
    dev = torch.device(device)
    need = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    have = [k for k in need if k in os.environ]
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"The 'device' parameter of init_distributed is {device!r} but CUDA is not available. "
                          f"Use device='cpu' (Gloo) or run on a GPU node.")
    if not have:
        return 0, 1, dev
    if len(have) != len(need):
        raise ConfigError(f"Incomplete torch.distributed environment: {sorted(set(need) - set(have))} missing. "
                          f"Launch with torchrun.")
    if dev.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend_for(dev), timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size(), dev


def shard_range(n: int, rank: int, world: int) -> Tuple[int, int]:
    """Contiguous balanced rows ``[lo, hi)`` of rank ``rank`` out of ``world`` (sizes differ by at most 1).

    Raises:
        ConfigError: for ``world < 1``, a rank outside ``0..world-1`` or ``n < world``.
    """
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"The 'rank' parameter of shard_range must be in 0..{world - 1}. Got {rank!r} instead.")
    if n < world:
        raise ConfigError(f"The 'n' parameter of shard_range must be >= the world size {world}. Got {n!r} instead.")
    q, r = divmod(int(n), int(world))
    lo = rank * q + min(rank, r)
    return lo, lo + q + (1 if rank < r else 0)


def sampler_indices(n: int, rank: int, world: int) -> np.ndarray:
    """The indices a ``DistributedSampler(shuffle=False)`` gives ``rank``, without its padding.

    ``DistributedSampler`` pads the dataset by repeating samples so every rank gets the same count;
    the head problem must count each sample once, so the repeated tail is dropped.
    """
    from torch.utils.data.distributed import DistributedSampler

    s = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=False, drop_last=False)
    idx = np.fromiter(iter(s), dtype=np.int64)
    pos = rank + world * np.arange(idx.size)  # position in the padded global order
    return idx[pos < n]


def fingerprint_mismatch(fingerprints: Sequence[Mapping[str, Any]]) -> Optional[str]:
    """``None`` if every rank's fingerprint equals rank 0's, else a message naming ranks and keys."""
    ref = dict(fingerprints[0])
    problems = []
    for r, fp in enumerate(fingerprints[1:], start=1):
        fp = dict(fp)
        keys = sorted(k for k in set(ref) | set(fp) if ref.get(k) != fp.get(k))
        if keys:
            problems.append(f"rank {r} differs from rank 0 in {', '.join(f'{k}={fp.get(k)!r} (rank 0: {ref.get(k)!r})' for k in keys)}")
    return "; ".join(problems) or None


def check_same_config(fingerprint: Mapping[str, Any]) -> None:
    """All-gather ``fingerprint`` (plain data) and raise on every rank if any rank's differs.

    Raises:
        ConfigError: "Ranks have mismatched configs: ..." naming the ranks and keys (raised on every
            rank, so no rank is left waiting in a collective).
    """
    if not _active():
        return
    dist = _dist()
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, dict(fingerprint))
    msg = fingerprint_mismatch(out)
    if msg:
        raise ConfigError(f"Ranks have mismatched configs: {msg}. Launch every rank with the same config.")


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if _active():
        _dist().all_reduce(t)
    return t


class ShardedRows(RowSource):
    r"""This rank's rows of a sample-sharded training set: a row source whose sums are all-reduced.

    Wraps the rank's local rows (a tensor or any :class:`~reweight.rows.RowSource`, e.g. a
    memory-mapped store) with the global row count and the global index of each local row, so
    :class:`~reweight.head.HeadObjective` computes every sum over samples locally, then all-reduces;
    per-sample outputs are gathered by global index.

    Args:
        local: this rank's ``(n_local, D)`` rows (tensor or row source).
        index: ``(n_local,)`` global row index of each local row (default: the contiguous block after
            the rows of the lower ranks).
        n_global: the global ``n`` (default: all-reduced sum of the local counts; checked when given).
        chunk_rows: chunk size when ``local`` is a tensor.

    Raises:
        DataError: for an ``index`` of the wrong length.
        ConfigError: for ranks whose local counts do not add up to ``n_global``.
    """

    def __init__(self, local: Any, index: Optional[torch.Tensor] = None, n_global: Optional[int] = None,
                 chunk_rows: int = 1 << 20):
        if not isinstance(local, RowSource):
            local = ChunkedFeatures(local, chunk_rows=chunk_rows, dtype=local.dtype, device=local.device)
        self.inner = local
        self.dtype, self.device = local.dtype, local.device
        self.rank, self.world = rank_and_world()
        n_local = local.n_local
        total = int(_all_reduce(torch.tensor([n_local], dtype=torch.int64, device=self.device)).item())
        if n_global is not None and int(n_global) != total:
            raise ConfigError(f"The 'n_global' parameter of ShardedRows is {n_global} but the ranks hold "
                              f"{total} samples in total.")
        self.shape = (total, local.dim)
        self._n_local = n_local
        if index is None:
            sizes = [0] * self.world
            if _active():
                _dist().all_gather_object(sizes, n_local)
            else:
                sizes = [n_local]
            lo = sum(sizes[: self.rank])
            index = torch.arange(lo, lo + n_local)
        index = torch.as_tensor(index, dtype=torch.int64)
        if index.shape != (n_local,):
            raise DataError(f"Expected an index of shape ({n_local},), but got {tuple(index.shape)}.")
        self.index = index.to(self.device)

    @property
    def n_local(self) -> int:
        return self._n_local

    def __iter__(self) -> Iterator[Tuple[int, int, torch.Tensor]]:
        return iter(self.inner)

    def allreduce(self, t: torch.Tensor) -> torch.Tensor:
        return _all_reduce(t)

    def local(self, v: torch.Tensor) -> torch.Tensor:
        if v.ndim == 1 and v.shape[0] == self.n_local:  # given locally (also when one rank holds every row)
            return v
        if v.ndim == 1 and v.shape[0] == self.n:
            return v[self.index]
        raise DataError(f"Expected alpha of shape ({self.n},) or ({self.n_local},), but got {tuple(v.shape)}.")

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Assemble per-sample values ``(n_local, ...)`` of every rank into ``(n, ...)`` on every rank."""
        if local.shape[0] != self.n_local:
            raise DataError(f"Expected local values with {self.n_local} rows, but got {local.shape[0]}.")
        out = torch.zeros((self.n,) + tuple(local.shape[1:]), dtype=local.dtype, device=local.device)
        if not _active():
            out[self.index] = local
            return out
        dist = _dist()
        counts = [0] * self.world
        dist.all_gather_object(counts, self.n_local)
        m = max(counts)
        pad_v = torch.zeros((m,) + tuple(local.shape[1:]), dtype=local.dtype, device=local.device)
        pad_v[: self.n_local] = local
        pad_i = torch.zeros(m, dtype=torch.int64, device=local.device)
        pad_i[: self.n_local] = self.index
        vs = [torch.empty_like(pad_v) for _ in range(self.world)]
        ids = [torch.empty_like(pad_i) for _ in range(self.world)]
        dist.all_gather(vs, pad_v)
        dist.all_gather(ids, pad_i)
        for c, v, i in zip(counts, vs, ids):
            out[i[:c]] = v[:c]
        return out


class DistributedObjective(HeadObjective):
    r""":class:`~reweight.head.HeadObjective` over this rank's shard (:class:`ShardedRows`), the historical spelling.

    ``n`` is the global sample count, ``X``/``y`` are this rank's rows; ``alpha`` may be given
    globally ``(n,)`` or locally ``(n_local,)``; ``alpha_grad_from_v`` returns all ``n`` entries on every rank.

    Args:
        X: this rank's ``(n_local, D)`` features (tensor or row source).
        y: ``(n_local,)`` labels.
        num_classes: ``K``.
        lam: :math:`\lambda > 0`.
        index, n_global, chunk_rows: see :class:`ShardedRows`.
    """

    def __init__(self, X: Any, y: torch.Tensor, num_classes: int, lam: float, index: Optional[torch.Tensor] = None,
                 n_global: Optional[int] = None, chunk_rows: int = 1 << 20):
        check_lam(lam, "DistributedObjective")  # before any collective, so every rank fails alike
        super().__init__(ShardedRows(X, index=index, n_global=n_global, chunk_rows=chunk_rows), y, num_classes, lam)

    @property
    def index(self) -> torch.Tensor:
        return self.rows.index  # type: ignore[attr-defined]


#: The Hessian of a sharded objective is the head's Hessian (its products are all-reduced by the rows).
DistributedHessian = HeadHessian


class GatheredMethod:
    """Deprecated: a hypergradient method on a sharded objective already returns the gathered ``(n,)`` vector.

    Kept for one release so old launch scripts run; it forwards to the wrapped method.
    """

    def __init__(self, method: Any, obj: HeadObjective):
        warnings.warn("GatheredMethod is deprecated: HeadObjective over ShardedRows gathers per-sample "
                      "values itself; pass the method directly.", DeprecationWarning, stacklevel=2)
        self.method, self.obj = method, obj

    def val_alpha_grad(self, problem: Any, W: torch.Tensor, alpha: torch.Tensor,
                       v0: Optional[torch.Tensor] = None) -> Any:
        return self.method.val_alpha_grad(problem, W, alpha, v0=v0)


def extract_features_distributed(model: torch.nn.Module, images: Any, root: str | Path,
                                 labels: Optional[Any] = None, shard_rows: int = 65536, batch_size: int = 512,
                                 device: str = "cpu", overwrite: bool = False):
    """Each rank extracts the samples a ``DistributedSampler`` assigns it into its own store
    ``root/rank-XXXXX`` (with the global ``index`` and ``labels`` extras).

    The sampler's padding duplicates are dropped (:func:`sampler_indices`), so every sample is
    extracted exactly once across ranks; the rank's store then feeds :class:`DistributedObjective`
    (``index=store.extra("index")``).

    Returns:
        This rank's :class:`~reweight.store.FeatureStore`.
    """
    from .store import extract_features_to_store

    rank, world = rank_and_world()
    idx = sampler_indices(len(images), rank, world)
    st = extract_features_to_store(model, images, Path(root) / f"rank-{rank:05d}", labels=labels, shard_rows=shard_rows,
                                   batch_size=batch_size, device=device, indices=idx, overwrite=overwrite)
    if _active():
        _dist().barrier()
    return st
