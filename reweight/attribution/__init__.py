r"""Data attribution on the L2 head, all on one sign convention, and exact leave-one-out ground truth.

Every registered method (:data:`ATTRIBUTION`) estimates
:math:`\Delta_i = L(W^*_{-i}) - L(W^*)` -- positive means removing training sample ``i`` would
raise the target loss (``i`` helps) -- through one protocol: ``fit(problem)`` then
``scores(X, y, reduce)``. See :mod:`reweight.attribution.base`.

========================= ===================================================== =========================
name                      estimate of :math:`\Delta_i(x)`                        reference
========================= ===================================================== =========================
``influence_exact``       :math:`\frac{\alpha_i}n g_i^\top H^{-1}\nabla\ell_x h_i`, dense Cholesky   Koh & Liang 2017
``influence_cg``          same, :math:`H^{-1}` by CG (``HeadHessian.solve``)     Koh & Liang 2017
``influence_diag_ggn``    same, :math:`H\approx\operatorname{diag}` (BackPACK)   Koh & Liang 2017; BackPACK
``influence_kfac``        same, :math:`H\approx G\otimes A+\lambda I` (BackPACK KFLR) Martens & Grosse 2015
``newton_step``           one Newton step with :math:`H_{-i}` (Woodbury)        Koh & Liang 2017; Pregibon 1981
``representer``           same with :math:`H\approx\lambda I` (representer expansion) Yeh et al. 2018
``tracin``                :math:`\sum_t\eta_t\frac{\alpha_i}{|b|}\nabla\ell_i(W_t)\cdot\nabla\ell_x(W_t)` Pruthi et al. 2020
``trak``                  projected margin-gradient regression, ensembled        Park et al. 2023
``hypergrad_exact``/``_cg`` :math:`-\alpha_i\partial L/\partial\alpha_i` (reweight.hypergrad) Pedregosa 2016
========================= ===================================================== =========================

Ground truth and benchmarks: :func:`exact_loo` (chord steps with the exact leave-one-out Hessian), :func:`lds`
(linear datamodeling score on random half-subsets), :func:`faithfulness` (remove/keep top-K).
"""

from __future__ import annotations

from ..validate import check_indices, check_lam, check_top_k
from .base import (
                   ATTRIBUTION,
                   AttributionMethod,
                   AttributionProblem,
                   bilinear_scores,
                   check_queries,
                   loss_change_from_v,
                   make_attribution,
                   query_residuals,
                   target_gradients,
)
from .faithfulness import faithfulness
from .hypergrad_fo import HypergradCG, HypergradExact, HypergradFirstOrder
from .influence import InfluenceCG, InfluenceDiagGGN, InfluenceExact, InfluenceKFAC
from .lds import SubsetOutputs, lds, random_subsets, subset_outputs
from .loo import LOOResult, exact_loo, retrain
from .newton_step import NewtonStep, newton_step_directions
from .representer import (
                   Representer,
                   RepresenterExplanation,
                   explain,
                   representer_contributions,
                   representer_logits,
                   representer_values,
)
from .tracin import SGDTrace, TracIn, sgd_head
from .trak import TRAK, margin_gradient_factors, project_gradients

__all__ = [
    "ATTRIBUTION",
    "AttributionMethod",
    "AttributionProblem",
    "HypergradCG",
    "HypergradExact",
    "HypergradFirstOrder",
    "InfluenceCG",
    "InfluenceDiagGGN",
    "InfluenceExact",
    "InfluenceKFAC",
    "LOOResult",
    "NewtonStep",
    "Representer",
    "RepresenterExplanation",
    "SGDTrace",
    "SubsetOutputs",
    "TRAK",
    "TracIn",
    "bilinear_scores",
    "check_indices",
    "check_lam",
    "check_queries",
    "check_top_k",
    "exact_loo",
    "explain",
    "faithfulness",
    "lds",
    "loss_change_from_v",
    "make_attribution",
    "margin_gradient_factors",
    "newton_step_directions",
    "project_gradients",
    "query_residuals",
    "random_subsets",
    "representer_contributions",
    "representer_logits",
    "representer_values",
    "retrain",
    "sgd_head",
    "subset_outputs",
    "target_gradients",
]
