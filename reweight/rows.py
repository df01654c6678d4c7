r"""Row sources: where the head's training rows live, and how sums over them are completed.

The head problem of DESIGN section 2 touches the ``(n, D)`` feature matrix only through sums over
samples, so one implementation of every formula (:mod:`reweight.head`) serves every layout once it
can (1) iterate the rows it holds in chunks and (2) complete a sum across processes:

.. math::

    \sum_{i=1}^n t_i = \operatorname{allreduce}_{r}\Big(\sum_{\text{chunks } c \text{ of } r}\ \sum_{i\in c} t_i\Big).

A :class:`RowSource` yields ``(lo, hi, X[lo:hi])`` chunks of its local rows (``lo``/``hi`` local
offsets), knows the global row count ``n`` (the ``n`` of the ``1/n``), and provides ``allreduce``
(sum across ranks), ``gather`` (assemble per-sample values of every rank) and ``local`` (this rank's
entries of a global per-sample vector). Three layouts:

* :class:`TensorRows` -- an in-memory ``(n, D)`` tensor, one chunk (the fast path: the head's
  products run on the whole matrix);
* :class:`ChunkedFeatures` -- a tensor or a memory-mapped :class:`~reweight.store.FeatureStore` read
  ``chunk_rows`` at a time, optionally appending the bias column and casting chunk by chunk;
* :class:`~reweight.distributed.ShardedRows` -- any of the above holding one rank's shard, with
  ``torch.distributed`` all-reduce and all-gather.

Pattern after pyDVL's ``AggregateBatchOperator`` (what is computed per batch is kept apart from where
the batches come from and how they are summed).
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Tuple

import torch

from .errors import DataError
from .validate import check_int

__all__ = ["ChunkedFeatures", "RowSource", "TensorRows", "as_rows", "check_chunk_rows"]


def check_chunk_rows(chunk_rows: Any, where: str) -> int:
    """Return ``chunk_rows`` if it is an int >= 1, else raise :class:`~reweight.errors.ConfigError`."""
    return check_int(chunk_rows, "chunk_rows", where, minimum=1)  # type: ignore[return-value]


class RowSource:
    """Base class of row sources (see the module docstring): single-process defaults for the collectives.

    Subclasses set ``shape`` (``(n, D)``: global rows, columns), ``dtype``, ``device`` and implement
    :meth:`__iter__`.
    """

    shape: Tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    @property
    def n(self) -> int:
        """Global number of rows (the ``n`` of the head's ``1/n``)."""
        return int(self.shape[0])

    @property
    def n_local(self) -> int:
        """Rows held by this process."""
        return self.n

    @property
    def dim(self) -> int:
        """Columns ``D`` (bias column included when one is appended)."""
        return int(self.shape[1])

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[Tuple[int, int, torch.Tensor]]:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement __iter__ yielding (lo, hi, rows).")

    def allreduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over processes in place (identity in one process)."""
        return t

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Per-sample values of the local rows ``(n_local, ...)`` -> every sample's ``(n, ...)``."""
        if local.shape[0] != self.n_local:
            raise DataError(f"Expected local values with {self.n_local} rows, but got {local.shape[0]}.")
        return local

    def local(self, v: torch.Tensor) -> torch.Tensor:
        """This process's entries of a per-sample vector given globally ``(n,)`` (or already locally)."""
        if v.ndim != 1 or v.shape[0] not in (self.n, self.n_local):
            raise DataError(f"Expected alpha of shape {self.alpha_shapes()}, but got {tuple(v.shape)}.")
        return v

    def alpha_shapes(self) -> str:
        """The accepted shapes of a per-sample vector, for messages."""
        return f"({self.n},)" if self.n == self.n_local else f"({self.n},) or ({self.n_local},)"

    # a chunked matrix-product helper used by validation/tests: X @ B and G^T X over chunks
    def __matmul__(self, B: torch.Tensor) -> torch.Tensor:
        """``X @ B`` for ``B`` ``(D, m)``, the local rows assembled chunk by chunk: ``(n_local, m)``."""
        return torch.cat([x @ B for _, _, x in self])

    def tmatmul(self, G: torch.Tensor) -> torch.Tensor:
        r""":math:`G^\top X` for ``G`` ``(n_local, m)``, accumulated over chunks (local rows only): ``(m, D)``."""
        out: Optional[torch.Tensor] = None
        for lo, hi, x in self:
            out = G[lo:hi].T @ x if out is None else out.addmm_(G[lo:hi].T, x)
        assert out is not None
        return out

    def check_finite(self) -> None:
        """One pass raising :class:`DataError` on NaN/Inf (names row indices)."""
        for lo, _, x in self:
            bad = ~torch.isfinite(x).all(dim=1)
            if bool(bad.any()):
                rows = (torch.nonzero(bad).flatten()[:10] + lo).tolist()
                raise DataError(f"training features contain NaN/Inf; first offending rows: {rows}.")


class TensorRows(RowSource):
    """An in-memory ``(n, D)`` tensor as one chunk."""

    def __init__(self, X: torch.Tensor):
        self.X = X
        self.shape = (int(X.shape[0]), int(X.shape[1]))
        self.dtype, self.device = X.dtype, X.device

    def __iter__(self) -> Iterator[Tuple[int, int, torch.Tensor]]:
        yield 0, self.shape[0], self.X


class ChunkedFeatures(RowSource):
    r"""An ``(n, D)`` feature matrix seen as row chunks.

    Args:
        source: an ``(n, d)`` tensor or anything with ``shape``, ``dtype`` and ``chunks(chunk_rows)``
            yielding ``(lo, hi, rows)`` (a :class:`~reweight.store.FeatureStore`).
        chunk_rows: rows per chunk, >= 1.
        dtype: compute dtype of the chunks (default: the source's).
        device: compute device of the chunks (default CPU).
        bias: append a constant-1 column, so ``D = d + 1`` (see :func:`reweight.head.add_bias`).

    Raises:
        ConfigError: for ``chunk_rows < 1``.
        DataError: for a source that is not 2-D.
    """

    def __init__(self, source: Any, chunk_rows: int = 65536, dtype: Optional[torch.dtype] = None,
                 device: Optional[str | torch.device] = None, bias: bool = False):
        self.chunk_rows = check_chunk_rows(chunk_rows, "ChunkedFeatures")
        if len(tuple(source.shape)) != 2:
            raise DataError(f"Expected features of shape (n, d), but got shape {tuple(source.shape)}.")
        self.source, self.bias = source, bool(bias)
        self.dtype = dtype or source.dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        n, d = source.shape
        self.shape = (int(n), int(d) + int(self.bias))

    def __iter__(self) -> Iterator[Tuple[int, int, torch.Tensor]]:
        """Yield ``(lo, hi, X[lo:hi])`` in compute dtype/device (bias column appended if asked)."""
        if isinstance(self.source, torch.Tensor):
            raw = ((lo, min(self.n, lo + self.chunk_rows), self.source[lo:lo + self.chunk_rows])
                   for lo in range(0, self.n, self.chunk_rows))
        else:
            raw = self.source.chunks(self.chunk_rows)
        for lo, hi, x in raw:
            x = x.to(device=self.device, dtype=self.dtype)
            if self.bias:
                x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
            yield lo, hi, x


def as_rows(X: Any) -> RowSource:
    """``X`` as a :class:`RowSource`: a tensor becomes :class:`TensorRows`, a feature store a
    :class:`ChunkedFeatures`, a row source stays as it is.

    Raises:
        DataError: for anything else.
    """
    if isinstance(X, RowSource):
        return X
    if isinstance(X, torch.Tensor):
        return TensorRows(X)
    if hasattr(X, "chunks") and hasattr(X, "shape"):
        return ChunkedFeatures(X)
    raise DataError(f"Expected training features as a tensor, a feature store or a row source, but got "
                    f"{type(X).__name__}.")
