"""Staged training study: head-only vs warm-up -> freeze -> focus vs gradual unfreezing vs full fine-tuning.

MNIST-5k with 40% symmetric label noise, timm ``test_resnet`` (random init; no network here):

(a) ``a_head_only``   the core main job: warm-up (early stopping) -> frozen features -> learned weights
                      on the L2 head (``experiments/configs/main.yaml``);
(b) ``b_focus``       warm-up (all, CE) -> freeze (head + last block, CE) -> focus (head + last block,
                      weighted CE with alpha from the bilevel engine, recomputed every epoch: strategy B);
(b2) ``b_focus_once`` as (b) with the weights learned once at the start of the focus stage;
(c) ``c_gradual``     warm-up -> head -> + last block -> + last 2 blocks -> all, decreasing lr;
(d) ``d_full``        full fine-tuning with uniform weights.

Every strategy is one :class:`reweight.config.RunConfig` (one schema): (a) has no ``stages`` and runs
the main job (:func:`reweight.pipeline.run_main`), the others list their stages and run
:func:`reweight.staging.run_staged`. ``base`` is a partial RunConfig laid over every strategy's YAML
alike (``base.data.noise_rate=0.2``). Staged strategies share the epoch budget (8) and the rule
"restore the best clean-validation epoch at the end of each stage". Writes one run directory per
strategy and seed under ``out`` (metrics.jsonl per epoch, checkpoints per stage, summary.json,
DONE), ``results.csv`` (one row per run), ``results.md`` (mean and std over seeds) and the figure
``staged_curves.{pdf,png}`` (``carrot figure staged_curves``). The feature cache is
``<out>/.feature_cache`` unless ``base.features.cache_dir`` is set.

Usage::

    carrot staged                                  # the study, seed 0 (about 12 CPU-minutes)
    carrot staged seeds=[0,1,2]                    # three seeds (about 3x as long)
    carrot staged --quick                          # digits, 1 epoch per stage, seed 0 (~1 min)
    carrot staged seeds=[0] base.data.noise_rate=0.2
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Dict, List

from reweight.config import RunConfig, from_dict, load_config, to_dict
from reweight.config import help_field as _f
from reweight.errors import ConfigError
from reweight.staging import run_staged

from .study import Context, Study, shim

__all__ = ["STRATEGIES", "STUDY", "StagedConfig", "run_study"]

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).parent / "configs"
STRATEGIES = {
    "a_head_only": "main.yaml",
    "b_focus": "staged_b_focus.yaml",
    "b_focus_once": "staged_b_focus_once.yaml",
    "c_gradual": "staged_c_gradual.yaml",
    "d_full": "staged_d_full.yaml",
}
LABELS = {
    "a_head_only": "(a) head-only on warm-up features",
    "b_focus": "(b) warm-up > freeze > focus (B)",
    "b_focus_once": "(b2) warm-up > freeze > focus, weights once",
    "c_gradual": "(c) gradual unfreezing",
    "d_full": "(d) full fine-tuning, uniform",
}

#: RunConfig keys the study used to take at top level (``data.noise_rate=0.2``), now under ``base``
_RUN_KEYS = [f.name for f in fields(RunConfig) if f.name not in ("name", "out_dir", "seed", "stages")] + \
    [k for k in RunConfig.LEGACY_KEYS if "." not in k]


@dataclass(frozen=True)
class StagedConfig:
    """The staged-training study: which strategies and seeds, and what every strategy shares."""

    out: str = _f("runs/staged", "output folder: one run directory per strategy and seed, and the tables")
    seeds: List[int] = _f([0], "root seeds (one run of every strategy per seed)")
    strategies: List[str] = _f(list(STRATEGIES), f"strategies to run, from {', '.join(STRATEGIES)}")
    quick: bool = _f(False, "smoke run: digits, 1 epoch per stage, 10 outer steps (head-only: 2 warm-up epochs)")
    base: Dict[str, Any] = _f({}, "a partial RunConfig laid over every strategy's YAML, e.g. base.data.noise_rate=0.2")

    LEGACY_KEYS: ClassVar[Dict[str, str]] = {k: f"base.{k}" for k in _RUN_KEYS}

    def __post_init__(self) -> None:
        bad = [s for s in self.strategies if s not in STRATEGIES]
        if bad or not self.strategies:
            raise ConfigError(f"The 'strategies' parameter must be a non-empty list of names from "
                              f"{', '.join(STRATEGIES)}. Got {list(self.strategies)!r} instead.")
        if not self.seeds:
            raise ConfigError("The 'seeds' parameter must hold at least one seed. Got [] instead.")
        for k in ("name", "out_dir", "seed"):
            if k in self.base:
                raise ConfigError(f"The 'base.{k}' parameter is set by the study (out, seeds). Remove it.")


def _quick(d: Dict[str, Any]) -> Dict[str, Any]:
    d = dict(d)
    d["data"] = dict(d.get("data", {}), dataset="digits")
    d["outer"] = dict(d.get("outer", {}), steps=10)
    # a smoke run checks the plumbing: 1-2 epochs on digits can stay at chance, which must not stop it
    d["backbone"] = dict(d.get("backbone", {}), allow_chance=True)
    if d.get("stages"):
        d["stages"] = [dict(s, epochs=min(int(s.get("epochs", 1)), 1)) for s in d["stages"]]
    else:
        d["backbone"] = dict(d["backbone"], epochs=2, patience=1)
    return d


def _flatten(d: Dict[str, Any], prefix: str = "") -> List[str]:
    """``{"data": {"noise_rate": 0.2}}`` -> ``["data.noise_rate=0.2"]`` (values as JSON, which YAML reads back)."""
    out: List[str] = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={json.dumps(v)}")
    return out


def _load(strategy: str, seed: int, cfg: StagedConfig) -> RunConfig:
    """The strategy's RunConfig: its YAML, then ``cfg.base`` (the same for every strategy), then ``quick``."""
    d = to_dict(load_config(CONFIGS / STRATEGIES[strategy], _flatten(cfg.base) + [f"seed={seed}"]))
    if cfg.quick:
        d = _quick(d)
    d["name"] = f"{strategy}_s{seed}"
    d["out_dir"] = cfg.out
    if "cache_dir" not in cfg.base.get("features", {}):
        d["features"] = dict(d.get("features", {}), cache_dir=str(Path(cfg.out) / ".feature_cache"))
    return from_dict(RunConfig, d)


def _head_only(cfg: RunConfig, overwrite: bool, progress: bool) -> Dict[str, Any]:
    from reweight.pipeline import features, run_main

    t0, c0 = time.perf_counter(), time.process_time()
    done_before = (Path(cfg.out_dir) / cfg.name / "DONE").is_file()
    s = run_main(cfg, overwrite=overwrite, progress=progress)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    fs = features(cfg)  # cache hit: warm-up time and width
    d = fs.meta["feature_dim"] + (1 if cfg.head.bias else 0)
    from reweight.backbones import create_backbone
    from reweight.data import load_dataset

    chans = int(load_dataset(cfg.data.dataset).images.shape[1])
    total = sum(p.numel() for p in create_backbone(cfg.backbone.model, fs.num_classes, in_chans=chans).parameters())
    return {
        "test_acc": s["learned"]["test_acc"], "val_acc": s["learned"]["val_acc"],
        "test_acc_uniform_head": s["uniform"]["test_acc"], "weights_auroc": s["auroc"],
        "seconds": float(fs.meta.get("warmup_seconds") or 0.0) + s["seconds"]["learned"] + s["seconds"]["uniform_head"],
        "wall_seconds": wall, "epochs": len(fs.meta["warmup_history"]),
        # CPU time of this call: warm-up + features + heads, unless the run or its features were cached
        "cpu_seconds": None if (done_before or s["feature_cache_hit"]) else cpu,
        "final_trainable_params": fs.num_classes * d, "max_trainable_params": total,
    }


def _staged(cfg: RunConfig, overwrite: bool, progress: bool) -> Dict[str, Any]:
    t0 = time.perf_counter()
    out = run_staged(cfg, overwrite=overwrite, progress=progress)
    s = out.summary
    return {
        "test_acc": s["final_test_acc"], "val_acc": s["final_val_acc"], "test_acc_uniform_head": None,
        "weights_auroc": s["weights_auroc"], "seconds": s["seconds_stages"], "wall_seconds": time.perf_counter() - t0,
        "cpu_seconds": s.get("cpu_seconds_stages"),
        "epochs": s["epochs"], "final_trainable_params": s["stages"][-1]["trainable_params"],
        "max_trainable_params": s["max_trainable_params"],
    }


def _markdown(df) -> str:
    import numpy as np

    g = df.groupby("strategy", sort=False)
    lines = ["| strategy | test acc | val acc* | AUROC of weights | time (s) | CPU time (s) | epochs "
             "| trainable params (final / max) | seeds |",
             "|---|---|---|---|---|---|---|---|---|"]

    def ms(x, fmt="{:.4f}"):
        x = x.dropna()
        if x.empty:
            return "--"
        return fmt.format(x.mean()) + (f" ± {fmt.format(x.std(ddof=1))}" if len(x) > 1 else "")

    for name, r in g:
        lines.append(f"| {LABELS.get(name, name)} | {ms(r['test_acc'])} | {ms(r['val_acc'])} | {ms(r['weights_auroc'], '{:.3f}')} "
                     f"| {ms(r['seconds'], '{:.0f}')} | {ms(r['cpu_seconds'].astype(float), '{:.0f}')} "
                     f"| {int(np.round(r['epochs'].mean()))} "
                     f"| {int(r['final_trainable_params'].iloc[0]):,} / {int(r['max_trainable_params'].iloc[0]):,} | {len(r)} |")
    lines.append("")
    lines.append("*val acc: the clean validation split is also the outer objective of the learned weights in (a), (b) "
                 "and (b2), and every strategy picks its best epoch per stage on it, so test acc is the fair column. "
                 "time: wall-clock seconds of the strategy (warm-up included); CPU time: process CPU seconds "
                 "(both threads), more stable than wall time on a shared machine.")
    return "\n".join(lines) + "\n"


def run_study(cfg: StagedConfig, overwrite: bool = False, progress: bool = False) -> Any:
    """Run every strategy for every seed; write results.csv, results.md and the figure. Returns the table."""
    import pandas as pd

    from reweight.runs import atomic_write_text

    out = Path(cfg.out)
    cfgs = {(st, sd): _load(st, sd, cfg) for st in cfg.strategies for sd in cfg.seeds}  # validate first
    rows: List[Dict[str, Any]] = []
    for (st, sd), rc in cfgs.items():
        log.info("strategy %s seed %d", st, sd)
        res = _staged(rc, overwrite, progress) if rc.stages else _head_only(rc, overwrite, progress)
        rows.append({"strategy": st, "seed": sd, "run_dir": str(out / rc.name), **res})
        print(f"{st:14s} seed {sd}: test acc {res['test_acc']:.4f}  auroc "
              f"{'--' if res['weights_auroc'] is None else format(res['weights_auroc'], '.3f')}  "
              f"{res['seconds']:.1f}s", flush=True)
    df = pd.DataFrame(rows)
    timing = ["seconds", "wall_seconds", "cpu_seconds"]
    csv = df.drop(columns=timing).to_csv(index=False, float_format="%.6g")
    atomic_write_text(out / "results.csv", csv)  # no timings: byte-identical on rerun
    atomic_write_text(out / "results_timing.csv", df[["strategy", "seed"] + timing].to_csv(index=False, float_format="%.1f"))
    atomic_write_text(out / "results.md", _markdown(df))
    return df


def _run(cfg: StagedConfig, ctx: Context) -> Dict[str, Any]:
    t0 = time.perf_counter()
    run_study(cfg, overwrite=ctx.overwrite, progress=ctx.progress)
    out = Path(cfg.out)
    figure: List[str] = []
    try:
        from paper_figs import draw_figure

        figure = [str(p) for p in draw_figure("staged_curves", [out], out / "staged_curves")]
    except ImportError as e:  # matplotlib missing
        log.warning("No figure: %s", e)
    return {"out": str(out), "figure": figure, "seconds": time.perf_counter() - t0}


def _report(res: Dict[str, Any]) -> str:
    out = Path(res["out"])
    lines = [(out / "results.md").read_text()]
    if res["figure"]:
        lines.append("figure: " + ", ".join(res["figure"]))
    lines.append(f"total {res['seconds']:.0f}s; results in {out}")
    return "\n".join(lines)


STUDY = Study(name="staged", summary="head-only vs warm-up > freeze > focus vs gradual unfreezing vs full fine-tuning",
              config=StagedConfig, run=_run, report=_report, quick=("quick=true", "out=runs/staged_quick"),
              threads_key="base.threads",
              legacy_flags={"--seeds": "seeds[]", "--strategies": "strategies[]", "--out": "out"},
              description=__doc__ or "")

if __name__ == "__main__":
    shim("staged")
