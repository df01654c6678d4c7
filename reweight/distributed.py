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

:class:`DistributedObjective` has the interface of :class:`~reweight.head.HeadObjective`, so the
head solver, :class:`~reweight.hypergrad.BilevelProblem` and :func:`~reweight.hypergrad.hypergradient`
are reused as they are; :class:`GatheredMethod` wraps a registered hypergradient method so its
per-sample output is gathered. The validation split is small and replicated on every rank.

Launch (one node, 2 CPU processes)::

    torchrun --standalone --nproc_per_node=2 -m experiments.dist_hypergrad

See ``docs/scale.md`` for clusters (multi-node ``torchrun --nnodes ... --rdzv-endpoint ...``).

References:
    Li et al., "PyTorch Distributed: Experiences on Accelerating Data Parallel Training", VLDB 2020.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .data import check_labels
from .errors import ConfigError, DataError
from .head import HeadHessian
from .hypergrad import BilevelProblem, HypergradMethod, ValAlphaGrad
from .streaming import ChunkedFeatures, ChunkedRows, StreamingHessian

__all__ = [
    "DistributedHessian",
    "DistributedObjective",
    "GatheredMethod",
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


class DistributedObjective(ChunkedRows):  # probs/residuals/sample_losses of the local rows
    r"""The inner objective :math:`F(W,\alpha)` with the samples sharded across ranks.

    Same interface as :class:`~reweight.head.HeadObjective`; ``n`` is the global sample count,
    ``X``/``y`` are this rank's rows. ``alpha`` may be given globally ``(n,)`` (this rank's entries
    are taken by ``index``) or locally ``(n_local,)``.

    Args:
        X: this rank's ``(n_local, D)`` features: a tensor or a :class:`~reweight.streaming.ChunkedFeatures`
            (a memory-mapped store: the shard need not fit in memory either).
        y: ``(n_local,)`` labels.
        num_classes: ``K``.
        lam: :math:`\lambda > 0`.
        index: ``(n_local,)`` global row index of each local row (default: the contiguous
            :func:`shard_range` of this rank).
        n_global: the global ``n`` (default: all-reduced sum of the local counts).
        chunk_rows: chunk size when ``X`` is a tensor.

    Raises:
        DataError: for labels that do not match ``X``, or an ``index`` of the wrong length.
        ConfigError: for ``lam <= 0`` or ranks whose local counts do not add up to ``n_global``.
    """

    def __init__(self, X: torch.Tensor | ChunkedFeatures, y: torch.Tensor, num_classes: int, lam: float,
                 index: Optional[torch.Tensor] = None, n_global: Optional[int] = None, chunk_rows: int = 1 << 20):
        if not isinstance(X, ChunkedFeatures):
            X = ChunkedFeatures(X, chunk_rows=chunk_rows, dtype=X.dtype, device=X.device)
        if not lam > 0:
            raise ConfigError(f"The 'lam' parameter must be > 0 (strict L2 makes the inner problem strongly convex). Got {lam!r} instead.")
        check_labels(y, num_classes, "training labels", n=X.n, require_all_classes=False)
        self.X, self.y, self.K, self.lam = X, torch.as_tensor(y).to(X.device), int(num_classes), float(lam)
        self.rank, self.world = rank_and_world()
        self.n_local = X.n
        total = int(_all_reduce(torch.tensor([self.n_local], dtype=torch.int64, device=X.device)).item())
        if n_global is not None and int(n_global) != total:
            raise ConfigError(f"The 'n_global' parameter of DistributedObjective is {n_global} but the ranks hold "
                              f"{total} samples in total.")
        self.n = total
        if index is None:
            sizes = [0] * self.world
            if _active():
                _dist().all_gather_object(sizes, self.n_local)
            else:
                sizes = [self.n_local]
            lo = sum(sizes[: self.rank])
            index = torch.arange(lo, lo + self.n_local)
        index = torch.as_tensor(index, dtype=torch.int64)
        if index.shape != (self.n_local,):
            raise DataError(f"Expected an index of shape ({self.n_local},), but got {tuple(index.shape)}.")
        self.index = index.to(X.device)
        self._local = SimpleNamespace(X=X, n=self.n, K=self.K, lam=0.0)  # chunk operators with the global n

    @property
    def shape(self) -> Tuple[int, int]:
        return (self.K, self.X.shape[1])

    def local_alpha(self, alpha: torch.Tensor) -> torch.Tensor:
        """This rank's entries of ``alpha`` (given globally ``(n,)`` or locally ``(n_local,)``)."""
        if alpha.shape == (self.n_local,):
            return alpha
        if alpha.shape == (self.n,):
            return alpha[self.index]
        raise DataError(f"Expected alpha of shape ({self.n},) or ({self.n_local},), but got {tuple(alpha.shape)}.")

    def check_alpha(self, alpha: torch.Tensor) -> None:
        a = self.local_alpha(alpha)
        if not bool(torch.isfinite(a).all()) or bool((a < 0).any()):
            raise DataError("alpha must be finite and >= 0.")

    def loss(self, W: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        r""":math:`F(W,\alpha)` (all-reduced: the same on every rank)."""
        s = (self.local_alpha(alpha) * self.sample_losses(W)).sum().reshape(1)
        return _all_reduce(s)[0] / self.n + 0.5 * self.lam * (W * W).sum()

    def grad(self, W: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        r""":math:`\nabla_W F` (all-reduced)."""
        a = self.local_alpha(alpha)
        out = torch.zeros_like(W)
        for lo, hi, x in self.X:
            G = torch.softmax(x @ W.T, dim=1)
            G[torch.arange(hi - lo, device=G.device), self.y[lo:hi]] -= 1
            G.mul_(a[lo:hi, None])
            out.addmm_(G.T, x)
        return _all_reduce(out).div_(self.n).add_(W, alpha=self.lam)

    optimality = grad

    def hessian(self, W: torch.Tensor, alpha: torch.Tensor) -> "DistributedHessian":
        """The all-reduced :class:`DistributedHessian` at ``W``."""
        return DistributedHessian(self, W, self.local_alpha(alpha))

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


class DistributedHessian(HeadHessian):
    r"""The head Hessian with sharded samples: :math:`HU = \operatorname{allreduce}_r(H_r U) + \lambda U`.

    :math:`H_r` is this rank's streamed operator (:class:`~reweight.streaming.StreamingHessian` with
    ``lam = 0`` and the global ``n``). :meth:`solve` is inherited from :class:`HeadHessian`, so CG
    runs on the all-reduced products, identically on every rank.
    """

    def __init__(self, obj: DistributedObjective, W: torch.Tensor, alpha_local: torch.Tensor):
        self.obj, self.lam, self.n, self.K, self.D = obj, obj.lam, obj.n, obj.K, obj.X.shape[1]
        self.X, self.P, self.alpha = obj.X, None, alpha_local
        self._local = StreamingHessian(obj._local, W, alpha_local)
        self.hvps = 0

    def matvec(self, U: torch.Tensor) -> torch.Tensor:
        out = _all_reduce(self._local.matvec(U)).add_(U, alpha=self.lam)
        self.hvps += U.shape[0] if U.ndim == 3 else 1
        return out

    __call__ = matvec

    def dense(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """All-reduced dense Hessian (float64 assembly; small problems and tests only)."""
        H = _all_reduce(self._local.dense(torch.float64).contiguous())
        H = H + self.lam * torch.eye(self.K * self.D, dtype=H.dtype, device=H.device)
        return H.to(dtype or self.X.dtype)


class GatheredMethod:
    """Wrap a hypergradient method so its per-sample :math:`\\partial L_{val}/\\partial\\alpha` is gathered.

    The wrapped method (e.g. :class:`~reweight.hypergrad.ConjugateGradient` or
    :class:`~reweight.hypergrad.Exact`) runs on a :class:`DistributedObjective` and yields this rank's
    components; they are gathered into the global ``(n,)`` vector on every rank, so
    :func:`~reweight.hypergrad.hypergradient` can apply the weight chain rule as in one process.
    """

    def __init__(self, method: HypergradMethod, obj: DistributedObjective):
        self.method, self.obj = method, obj

    def val_alpha_grad(self, problem: BilevelProblem, W: torch.Tensor, alpha: torch.Tensor,
                       v0: Optional[torch.Tensor] = None) -> ValAlphaGrad:
        vag = self.method.val_alpha_grad(problem, W, alpha, v0=v0)
        vag.grad_alpha = self.obj.gather(vag.grad_alpha)
        return vag


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
