"""End-to-end tests of the attribution experiments and figures on tiny synthetic features (seconds)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from reweight.config import load_config
from reweight.errors import ConfigError
from reweight.features import FeatureSet


def _features(n=150, d=4, K=3, seed=0) -> FeatureSet:
    g = torch.Generator().manual_seed(seed)
    W = 2 * torch.randn(K, d, generator=g)

    def draw(m):
        X = torch.randn(m, d, generator=g)
        return X, torch.multinomial(torch.softmax(X @ W.T, 1), 1, generator=g)[:, 0]

    Xtr, ytr = draw(n)
    Xv, yv = draw(60)
    Xte, yte = draw(40)
    corrupted = torch.zeros(n, dtype=torch.bool)
    corrupted[:15] = True
    return FeatureSet(X_train=Xtr, y_train=ytr, y_train_clean=ytr, corrupted=corrupted, X_val=Xv, y_val=yv,
                      X_test=Xte, y_test=yte, num_classes=K, train_index=torch.arange(n),
                      meta={"cache_hit": True, "feature_dim": d})


@pytest.fixture()
def fake_features(monkeypatch):
    """Every study builds its features through reweight.pipeline.features: serve the tiny synthetic set."""
    import reweight.pipeline as P

    fs = _features()
    monkeypatch.setattr(P, "build_features", lambda *a, **k: fs)
    return fs


TINY = ["lams=[0.1]", "seeds=[0,1]", "subset_size=20", "n_queries=3", "lds_subsets=4",
        "method_options={trak: {n_models: 2, proj_dim: 8}, tracin: {epochs: 2}}"]


def test_sanity_end_to_end_is_reproducible(fake_features, tmp_path):
    from experiments.sanity import SanityConfig, run_sanity
    from paper_figs import draw_figure

    outs = []
    for name in ("a", "b"):
        cfg = load_config(None, TINY + [f"out_dir={tmp_path}", f"name={name}"], cls=SanityConfig)
        res = run_sanity(cfg)
        outs.append(tmp_path / "sanity" / name)
        assert (outs[-1] / "DONE").is_file()
        assert "influence_exact" in res["table"]
    for f in ("per_seed.csv", "summary.csv", "loo_scores.csv"):
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f
    import pandas as pd

    df = pd.read_csv(outs[0] / "per_seed.csv")
    ex = df[(df["method"] == "influence_exact") & (df["target"] == "val")]
    assert len(ex) == 2 and float(ex["spearman"].min()) > 0.9
    paths = draw_figure("loo_scatter", [outs[0]], tmp_path / "fig" / "scatter")
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)


def test_sanity_through_the_command_line(fake_features, tmp_path, capsys):
    """``carrot sanity`` and the old ``python -m experiments.sanity`` spelling (old keys read at their new place)."""
    from experiments.cli import main
    from experiments.sanity import SanityConfig

    assert main(["sanity", "--quiet", *TINY, "seeds=[0]", f"out_dir={tmp_path}", "name=cli"]) == 0
    out = capsys.readouterr().out
    assert "influence_exact" in out and str(tmp_path / "sanity" / "cli") in out
    with pytest.warns(DeprecationWarning) as seen:
        cfg = load_config(None, ["feature_seed=3", "data.dataset=digits", "threads=1"], cls=SanityConfig)
    text = " ".join(str(w.message) for w in seen)
    assert "feature_seed -> base.seed" in text and "threads -> base.threads" in text and "data -> base.data" in text
    assert cfg.base.seed == 3 and cfg.base.data.dataset == "digits" and cfg.base.threads == 1


def test_faithfulness_and_bench_end_to_end(fake_features, tmp_path):
    from experiments.bench_loo import BenchConfig, run_bench
    from experiments.faithfulness import FaithfulnessConfig, run_faithfulness
    from paper_figs import draw_figure

    cfg = load_config(None, [f"out_dir={tmp_path}", "n_queries=2", "ks=[1,5]", "n_random=1",
                             "methods=[influence_exact, representer]"], cls=FaithfulnessConfig)
    res = run_faithfulness(cfg)
    run = tmp_path / "faithfulness" / "main"
    assert (run / "DONE").is_file() and "representer" in res["table"]
    assert all(p.is_file() for p in draw_figure("faithfulness", [run], tmp_path / "fig" / "faith"))
    bcfg = load_config(None, ["m=5", "methods=[influence_exact, representer]", f"out={tmp_path / 'bench'}"],
                       cls=BenchConfig)
    b = run_bench(bcfg)
    saved = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert saved["loo"]["newton_step"]["max_abs_diff_delta_val_vs_scratch"] < 1e-6
    assert saved["loo"]["none"]["all_converged"] and b["estimators"]["representer"]["n_scored"] == 150


@pytest.mark.parametrize("override,match", [("lams=[0.0]", "The 'lams' parameter of SanityConfig must be"),
                                            ("subset_size=3", "The 'subset_size' parameter of SanityConfig"),
                                            ("methods=[nope]", "Unknown attribution method 'nope'"),
                                            ("bogus=1", "Unknown config key 'bogus'")])
def test_sanity_config_errors(override, match):
    from experiments.sanity import SanityConfig

    with pytest.raises(ConfigError, match=match):
        load_config(None, [override], cls=SanityConfig)


def test_correlations_and_top_overlap():
    """The study's correlations are analysis.tables.rank_correlations (top 10%), NaN for non-finite scores."""
    from experiments.sanity import CORRELATIONS, correlations

    x = np.arange(20.0)
    r = correlations(x, x ** 3)
    assert set(r) == set(CORRELATIONS)
    assert r["spearman"] == pytest.approx(1.0) and r["kendall"] == pytest.approx(1.0) and r["top_overlap"] == 1.0
    r = correlations(-x, x)
    assert r["spearman"] == pytest.approx(-1.0) and r["top_overlap"] == 0.0
    assert np.isnan(correlations(np.ones(5), x[:5])["spearman"])
    assert all(np.isnan(v) for v in correlations(np.array([1.0, np.nan, 2.0]), x[:3]).values())


def test_bench_precond_routes_agree_with_the_exact_solve(fake_features, tmp_path):
    """Every route of the influence benchmark gives the exact float64 scores (a wrong sign, factor of n or lambda
    scaling in any route shows here), the exact route uses no HVP, and the DENSE_MAX sweep writes one row per d."""
    import pandas as pd

    from experiments.bench_precond import BenchPrecondConfig, influence_route, run_bench
    from reweight.head import HeadObjective, add_bias, solve_head

    cfg = load_config(None, [f"out_dir={tmp_path}", "rounds=1", "dims=[2,4]", "base.head.lam=0.01",
                             "routes=[exact, auto, dense, dense_f32, kfac, block_jacobi, none]"], cls=BenchPrecondConfig)
    res = run_bench(cfg)
    df = pd.read_csv(tmp_path / "default" / "results.csv")
    assert sorted(set(df.D)) == [3, 5] and len(df) == 14
    assert (df.max_rel_diff_vs_exact < 1e-7).all()
    assert (df[df.route == "exact"].hvps == 0).all() and (df[df.route == "none"].hvps > 0).all()
    assert df.converged.all()
    assert set(res["summary"]["first_KD_faster_than_exact"]) == {"auto", "dense", "dense_f32", "kfac", "block_jacobi", "none"}
    # the exact route against an independent answer: Delta_i = (alpha_i / n) g_i^T H^{-1} grad L_val h_i
    fs = fake_features
    X, Xv = add_bias(fs.X_train.double()), add_bias(fs.X_val.double())
    inner = HeadObjective(X, fs.y_train, fs.num_classes, 0.01)
    alpha = torch.rand(X.shape[0], dtype=torch.float64) + 0.5
    W = solve_head(inner, alpha, grad_tol=1e-12).W
    K, D = W.shape
    P = torch.softmax(X @ W.T, 1)
    G = P - torch.nn.functional.one_hot(fs.y_train, K).double()
    H = torch.zeros(K * D, K * D, dtype=torch.float64)
    for i in range(X.shape[0]):
        S = torch.diag(P[i]) - torch.outer(P[i], P[i])
        H += alpha[i] * torch.kron(S, torch.outer(X[i], X[i]))
    H = H / X.shape[0] + 0.01 * torch.eye(K * D, dtype=torch.float64)
    Pv = torch.softmax(Xv @ W.T, 1)
    gv = ((Pv - torch.nn.functional.one_hot(fs.y_val, K).double()).T @ Xv / Xv.shape[0]).reshape(-1)
    V = torch.linalg.solve(H, gv).reshape(K, D)
    want = alpha / X.shape[0] * (G * (X @ V.T)).sum(1)
    for route in ("exact", "auto", "kfac", "none"):
        got = influence_route(route, inner, Xv, fs.y_val, W, alpha, 1e-12)[0]
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-10 * float(want.abs().max())), route


@pytest.mark.parametrize("override,match", [
    ("routes=[nope]", "The 'routes' parameter of bench_precond must be one of"),
    ("routes=[]", "must be a non-empty list"),
    ("routes=[auto, auto]", "lists a route twice"),
    ("rtol=0", "The 'rtol' parameter of bench_precond"),
    ("rounds=0", "The 'rounds' parameter of bench_precond"),
    ("dims=[0]", "The 'dims' parameter of bench_precond"),
    ("base.head.dtype=float32", "must be 'float64'"),
])
def test_bench_precond_config_errors(override, match):
    from experiments.bench_precond import BenchPrecondConfig

    with pytest.raises(ConfigError, match=match):
        load_config(None, [override], cls=BenchPrecondConfig)


def test_bench_precond_refuses_too_many_dims_before_writing(fake_features, tmp_path):
    from experiments.bench_precond import BenchPrecondConfig, run_bench

    cfg = load_config(None, [f"out_dir={tmp_path}", "dims=[99]"], cls=BenchPrecondConfig)
    with pytest.raises(ConfigError, match="more than the 4 feature columns"):
        run_bench(cfg)
    assert not (tmp_path / "default").exists()
