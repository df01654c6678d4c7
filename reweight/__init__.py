"""CARROT: bilevel sample reweighting on frozen backbones.

A curated API, imported lazily: ``import reweight`` is light (it does not import torch's heavy
extras, timm, BackPACK or ``higher``); ``reweight.HeadObjective`` imports :mod:`reweight.head` on
first use. The modules stay importable directly (``from reweight.head import HeadObjective``).

Example::

    import reweight as rw
    cfg = rw.load_config("experiments/configs/main.yaml", ["seed=1"])
    summary = rw.run_main(cfg)                       # the main job (uniform vs learned weights)
    setup = rw.head_problem(cfg, rw.features(cfg))   # or build the pieces yourself
"""

from __future__ import annotations

import importlib
from typing import Any, Dict, List

__version__ = "0.1.0"

#: public name -> module that defines it
_API: Dict[str, str] = {
    # configuration, runs, errors
    "RunConfig": "config", "StageConfig": "config", "load_config": "config",
    "RunDir": "runs",
    "CarrotError": "errors", "ConfigError": "errors", "DataError": "errors", "NonFiniteError": "errors",
    "RunDirError": "errors",
    # the composition root
    "attribution_problem": "pipeline", "bilevel_problem": "pipeline", "features": "pipeline",
    "head_problem": "pipeline", "learn_weights": "pipeline", "run_main": "pipeline",
    # the head, weights, hypergradients, outer loop
    "HeadObjective": "head", "HeadHessian": "head", "add_bias": "head", "solve_head": "head",
    "WeightModel": "weights", "initial_s": "weights",
    "BilevelProblem": "hypergrad", "HYPERGRAD": "hypergrad", "hypergradient": "hypergrad", "make_method": "hypergrad",
    "run_bilevel": "bilevel",
    "BASELINES": "baselines", "make_baseline": "baselines",
    "conjugate_gradient": "linalg",
    # attribution
    "ATTRIBUTION": "attribution", "AttributionProblem": "attribution", "exact_loo": "attribution",
    "make_attribution": "attribution",
}

__all__ = sorted(["__version__", *_API])


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'reweight' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # cache: later lookups do not come here
    return value


def __dir__() -> List[str]:
    return sorted([*globals(), *_API])
