r"""Per-sample gradients of the linear softmax head, three ways, and memory-light inner products.

For the head (DESIGN section 2) the gradient of sample ``i``'s loss has the closed form

.. math::

    \nabla_W \ell(W h_i, y_i) = g_i h_i^\top, \qquad g_i = p_i - e_{y_i} \in \mathbb{R}^K,

so the ``(n, K, D)`` tensor of all of them is an outer product of the residuals ``G = P - Y``
``(n, K)`` and the features ``X`` ``(n, D)``. :func:`per_sample_grads` computes it by that closed
form (default), by ``torch.func.vmap(torch.func.grad(...))`` or by BackPACK's ``BatchGrad``
extension; the three agree to rounding (tested to 1e-6 in float64). The gradients are of the
*unweighted* sample loss :math:`\ell_i` without the L2 term; multiply by :math:`\alpha_i/n` for the
contribution of sample ``i`` to :math:`\nabla_W F`.

Most consumers need only inner products :math:`\langle A, \nabla_W\ell_i\rangle = g_i^\top A h_i`
with a fixed ``(K, D)`` matrix ``A`` (a validation gradient, :math:`H^{-1}\nabla L_{val}`, ...).
:func:`per_sample_inner_products` forms them for all ``i`` as
:math:`\operatorname{rowsum}(G \circ (X A^\top))` in ``O(n K D)`` time and ``O(n K)`` memory,
never materialising ``n x K x D``.

BackPACK is imported only inside :func:`per_sample_grads` (``method="backpack"``).

References:
    Dangel, Kunstner & Hennig, "BackPACK: Packing more into backprop", ICLR 2020.
    Goodfellow, "Efficient per-example gradient computations", arXiv:1510.01799, 2015.
"""

from __future__ import annotations

import warnings
from typing import Literal, Optional

import torch

from .errors import ConfigError, DataError
from .head import softmax_residuals
from .validate import check_features, check_labels

__all__ = ["PER_SAMPLE_METHODS", "per_sample_grads", "per_sample_inner_products", "residuals"]

PER_SAMPLE_METHODS = ("backpack", "closed", "func")


def _check_head(W: torch.Tensor, X: torch.Tensor, fname: str) -> None:
    if not isinstance(W, torch.Tensor) or W.ndim != 2:
        raise DataError(f"The 'W' parameter of {fname} must be a (K, D) tensor. "
                        f"Got {tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__} instead.")
    if W.shape[1] != X.shape[1]:
        raise DataError(f"The 'W' parameter of {fname} must have D = {X.shape[1]} columns (the feature width). "
                        f"Got shape {tuple(W.shape)} instead.")
    if not bool(torch.isfinite(W).all()):
        raise DataError(f"The 'W' parameter of {fname} must be finite. Got NaN/Inf entries instead.")


def residuals(W: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r""":math:`G = \operatorname{softmax}(X W^\top) - Y`, ``(n, K)``; row ``i`` is :math:`g_i`.

    Args:
        W: ``(K, D)`` head.
        X: ``(n, D)`` features.
        y: ``(n,)`` int64 labels.
    """
    return softmax_residuals(W, X, y)


def per_sample_grads(W: torch.Tensor, X: torch.Tensor, y: torch.Tensor,
                     method: Literal["closed", "func", "backpack"] = "closed") -> torch.Tensor:
    r"""All per-sample gradients :math:`\nabla_W\ell_i = g_i h_i^\top`, shape ``(n, K, D)``.

    Args:
        W: ``(K, D)`` head.
        X: ``(n, D)`` features (bias column included if any).
        y: ``(n,)`` int64 labels in ``0..K-1``.
        method: ``closed`` (outer product of residuals and features; default, fastest),
            ``func`` (``torch.func.vmap`` of ``torch.func.grad`` of the sample loss) or ``backpack``
            (BackPACK ``BatchGrad`` on a bias-free ``nn.Linear`` with a summed cross-entropy).

    Returns:
        ``(n, K, D)`` tensor in ``X``'s dtype. It holds ``n·K·D`` numbers: use
        :func:`per_sample_inner_products` when only inner products are needed.

    Raises:
        ConfigError: for an unknown ``method`` (lists the valid ones).
        DataError: for malformed ``W``, ``X`` or ``y``.
    """
    if method not in PER_SAMPLE_METHODS:
        raise ConfigError(f"The 'method' parameter of per_sample_grads must be one of "
                          f"{', '.join(repr(m) for m in PER_SAMPLE_METHODS)}. Got {method!r} instead.")
    check_features(X, "features")
    _check_head(W, X, "per_sample_grads")
    check_labels(y, W.shape[0], "labels", n=X.shape[0], require_all_classes=False)
    W, X, y = W.detach(), X.detach(), torch.as_tensor(y).to(X.device)
    if method == "closed":
        G = residuals(W, X, y)
        return G[:, :, None] * X[:, None, :]
    if method == "func":
        from torch.func import grad, vmap

        def sample_loss(w: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.cross_entropy((w @ x)[None], t[None])

        return vmap(grad(sample_loss), in_dims=(None, 0, 0))(W, X, y)
    # backpack
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad

    K, D = W.shape
    lin = extend(torch.nn.Linear(D, K, bias=False).to(device=X.device, dtype=X.dtype))
    with torch.no_grad():
        lin.weight.copy_(W)
    lossfunc = extend(torch.nn.CrossEntropyLoss(reduction="sum"))  # sum: grad_batch = grad of each l_i
    with torch.enable_grad(), warnings.catch_warnings():
        # BackPACK's hooks fire although no input requires grad; torch warns about exactly that.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        loss = lossfunc(lin(X), y)
        with backpack(BatchGrad()):
            loss.backward()
    out = lin.weight.grad_batch.detach().clone()
    del lin, lossfunc, loss
    return out


def per_sample_inner_products(A: torch.Tensor, W: torch.Tensor, X: torch.Tensor, y: torch.Tensor,
                              chunk_size: Optional[int] = None, check: bool = True) -> torch.Tensor:
    r""":math:`\langle A, \nabla_W\ell_i\rangle = g_i^\top A h_i` for every sample, without ``n x K x D``.

    .. math::

        c = \operatorname{rowsum}\big(G \circ (X A^\top)\big) \in \mathbb{R}^n

    (for a batch ``A`` of shape ``(B, K, D)`` the result is ``(n, B)``). Time ``O(n K D)`` per matrix,
    memory ``O(n K)`` -- or ``O(chunk_size · K)`` with ``chunk_size``.

    Args:
        A: ``(K, D)`` or ``(B, K, D)``.
        W: ``(K, D)`` head at which :math:`g_i` is taken.
        X: ``(n, D)`` features.
        y: ``(n,)`` labels.
        chunk_size: process this many samples at a time (``None`` = all at once); results do not
            depend on it.
        check: validate the inputs (default). Inner loops that validated once pass ``False``.

    Returns:
        ``(n,)`` for a single ``A``, ``(n, B)`` for a batch.

    Raises:
        DataError: for shapes that do not match (names the offending one).
        ConfigError: for ``chunk_size < 1``.
    """
    if check:
        check_features(X, "features")
        _check_head(W, X, "per_sample_inner_products")
        check_labels(y, W.shape[0], "labels", n=X.shape[0], require_all_classes=False)
    if A.shape[-2:] != W.shape or A.ndim not in (2, 3):
        raise DataError(f"The 'A' parameter of per_sample_inner_products must have shape {tuple(W.shape)} or "
                        f"(B, {W.shape[0]}, {W.shape[1]}). Got {tuple(A.shape)} instead.")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ConfigError(f"The 'chunk_size' parameter of per_sample_inner_products must be an int >= 1 or None. "
                          f"Got {chunk_size!r} instead.")
    y = torch.as_tensor(y).to(X.device)
    batched = A.ndim == 3
    Ab = A if batched else A.unsqueeze(0)
    B, K, D = Ab.shape
    n = X.shape[0]
    step = n if chunk_size is None else chunk_size
    out = []
    for i in range(0, n, step):
        Xi, yi = X[i:i + step], y[i:i + step]
        G = residuals(W, Xi, yi)  # (m, K)
        XA = (Xi @ Ab.reshape(B * K, D).T).reshape(-1, B, K)  # (m, B, K)
        out.append((G[:, None, :] * XA).sum(dim=2))
    res = torch.cat(out, dim=0)
    return res if batched else res[:, 0]
