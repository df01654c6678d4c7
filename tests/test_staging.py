"""Staged training: configs, stage switches (fresh optimizers), losses, drift measures, checkpoints and resume."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import timm  # noqa: F401  (a hard dependency: a missing install must fail, not skip)
import torch
from torch.testing import assert_close

from reweight.backbones import configure_stage, weighted_ce
from reweight.config import DataConfig, RunConfig, StageConfig, from_dict, load_config
from reweight.errors import ConfigError, RunDirError
from reweight.staging import feature_drift, linear_cka, run_staged, staged_data

CONFIGS = Path(__file__).resolve().parent.parent / "experiments" / "configs"


def _cfg(tmp_path, stages=None, **kw):
    base = {
        "name": "t", "out_dir": str(tmp_path), "data": {"dataset": "digits", "noise_rate": 0.4},
        "backbone": {"batch_size": 64}, "outer": {"steps": 3}, "head": {"dtype": "float64"},
        "stages": stages or [
            {"name": "warmup", "trainable": ["all"], "lr": 2e-3, "epochs": 1},
            {"name": "freeze", "trainable": ["head", "last:1"], "lr_mult": {"last:1": 0.2}, "epochs": 1,
             "optimizer": "sgd", "lr": 0.02},
            {"name": "focus", "trainable": ["head", "last:1"], "lr": 1e-3, "lr_mult": {"last:1": 0.2}, "epochs": 2,
             "loss": "reweighted", "recompute_every": 1, "head_l2": 1e-3},
        ],
    }
    base.update(kw)
    return from_dict(RunConfig, base)


@pytest.fixture(scope="module")
def digits():
    return staged_data(DataConfig(dataset="digits", noise_rate=0.4), 0)


def _model(seed=0):
    from reweight.backbones import create_backbone

    torch.manual_seed(seed)
    return create_backbone("test_resnet", 10, in_chans=1)


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------


def test_experiment_configs_parse():
    files = sorted(CONFIGS.glob("staged*.yaml"))
    assert files, "experiments/configs/staged*.yaml missing"
    for f in files:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)  # shipped configs use the one schema
            cfg = load_config(f)
        assert cfg.stages and all(isinstance(s, StageConfig) for s in cfg.stages)
        assert cfg.backbone.model == "test_resnet" and cfg.backbone.batch_size == 128


def test_config_errors_name_valid_keys_and_ranges(tmp_path):
    with pytest.raises(ConfigError, match=r"Unknown config key 'stages\[0\]\.epoch'.*Valid keys under 'stages\[0\]': name, trainable"):
        _cfg(tmp_path, stages=[{"name": "a", "epoch": 1}])
    with pytest.raises(ConfigError, match=r"The 'stages\[a\]\.lr' parameter must be > 0\. Got 0\.0 instead"):
        _cfg(tmp_path, stages=[{"name": "a", "lr": 0.0}])
    with pytest.raises(ConfigError, match=r"'stages\[0\]\.loss' parameter must be one of 'ce', 'reweighted'"):
        _cfg(tmp_path, stages=[{"name": "a", "loss": "mse"}])
    with pytest.raises(ConfigError, match="unique names"):
        _cfg(tmp_path, stages=[{"name": "a"}, {"name": "a"}])
    with pytest.raises(ConfigError, match=r"lr_mult\[head\]' parameter must be a number >= 0"):
        _cfg(tmp_path, stages=[{"name": "a", "lr_mult": {"head": -0.5}}])


# ---------------------------------------------------------------------------------------------
# stage switches
# ---------------------------------------------------------------------------------------------


def test_stage_switch_rebuilds_optimizer_with_exactly_the_trainable_parameters():
    from reweight.backbones import FreezeError, check_no_frozen_grads, trainable_names

    m = _model()
    schedule = [
        StageConfig(name="s1", trainable=["head"], lr=0.1, optimizer="sgd"),
        StageConfig(name="s2", trainable=["head", "last:1"], lr=0.05, lr_mult={"last:1": 0.1}, optimizer="sgd"),
        StageConfig(name="s3", trainable=["all"], lr=1e-3, lr_mult={"group:0": 0.0}, optimizer="adamw"),
        StageConfig(name="s4", trainable=["head"], lr=1e-2),
    ]
    old = None
    x, y = torch.randn(16, 1, 16, 16), torch.randint(0, 10, (16,))
    for st in schedule:
        setup = configure_stage(m, st)
        opt = setup.optimizer
        assert opt is not old and len(opt.state) == 0  # fresh: no stale momentum / Adam moments
        in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
        assert in_opt == {id(p) for p in m.parameters() if p.requires_grad}
        assert all(p.grad is None for p in m.parameters())
        # lr per group = base lr x multiplier
        for g, spec in zip(opt.param_groups, setup.groups):
            assert g["lr"] == pytest.approx(st.lr * spec["lr_mult"], rel=1e-15)
        if old is not None:  # the previous stage's optimizer no longer matches: the check is not vacuous
            with pytest.raises(FreezeError, match="does not hold exactly the trainable parameters"):
                check_no_frozen_grads(m, old)
        m.train()
        loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
        check_no_frozen_grads(m, opt)
        opt.step()
        assert len(opt.state) > 0 or st.optimizer == "sgd" and st.momentum == 0
        old = opt
    # multiplier 0 means frozen and excluded (not lr 0): the stem was frozen in s3
    m2 = _model()
    configure_stage(m2, schedule[2])
    assert not any(n.startswith(("conv1.", "bn1.")) for n in trainable_names(m2))
    assert {g["lr"] for g in configure_stage(m2, schedule[2]).optimizer.param_groups} == {1e-3}


def test_bad_stages_are_clear_errors():
    m = _model()
    with pytest.raises(ConfigError, match=r"Stage 'x': Selector 'layer7' matches no parameter.*Valid selectors"):
        configure_stage(m, StageConfig(name="x", trainable=["head", "layer7"]))
    with pytest.raises(ConfigError, match="Stage 'y': The stage leaves nothing trainable"):
        configure_stage(m, StageConfig(name="y", trainable=["head"], frozen=["fc"]))
    with pytest.raises(ConfigError, match="leaves nothing trainable"):
        configure_stage(m, StageConfig(name="z", trainable=["head"], lr_mult={"head": 0.0}))


# ---------------------------------------------------------------------------------------------
# losses and drift measures
# ---------------------------------------------------------------------------------------------


def test_weighted_ce_twins_and_gradcheck():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 4, dtype=torch.float64, generator=g)
    y = torch.tensor([0, 1, 2, 3, 1, 0])
    ce = torch.nn.functional.cross_entropy(z, y, reduction="none")
    assert_close(weighted_ce(z, y), ce.mean(), rtol=1e-14, atol=0)
    assert_close(weighted_ce(z, y, torch.ones(6, dtype=torch.float64)), ce.mean(), rtol=1e-14, atol=0)
    # weight 2 == the sample twice; weight 0 == the sample dropped (sums, since the batch mean divides by B)
    w = torch.tensor([2.0, 1, 1, 0, 1, 1], dtype=torch.float64)
    dup = torch.cat([z, z[:1]])[[i for i in range(7) if i != 3]]
    ydup = torch.cat([y, y[:1]])[[i for i in range(7) if i != 3]]
    assert_close(weighted_ce(z, y, w) * 6, torch.nn.functional.cross_entropy(dup, ydup, reduction="sum"),
                 rtol=1e-13, atol=0)
    # gradient w.r.t. logits and weights by central finite differences (float64)
    zz = z.clone().requires_grad_(True)
    ww = torch.rand(6, dtype=torch.float64, generator=g).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: weighted_ce(a, y, b), (zz, ww), eps=1e-6, atol=1e-8)


def test_linear_cka_matches_gram_form_and_invariances():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(40, 5, dtype=torch.float64, generator=g)
    Y = X @ torch.randn(5, 3, dtype=torch.float64, generator=g) + 0.3 * torch.randn(40, 3, dtype=torch.float64, generator=g)

    def gram_cka(A, B):  # HSIC form with centred Gram matrices (the sample-space twin)
        n = A.shape[0]
        H = torch.eye(n, dtype=A.dtype) - 1.0 / n
        K, L = H @ A @ A.T @ H, H @ B @ B.T @ H
        return float((K * L).sum() / torch.sqrt((K * K).sum() * (L * L).sum()))

    assert linear_cka(X, Y) == pytest.approx(gram_cka(X, Y), rel=1e-12)
    assert linear_cka(X, X) == pytest.approx(1.0, rel=1e-12)
    Q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64, generator=g))
    assert linear_cka(X, 3.0 * X @ Q + 7.0) == pytest.approx(1.0, rel=1e-12)  # rotation, scale, shift
    assert linear_cka(X, torch.randn(40, 5, dtype=torch.float64, generator=g)) < 0.5
    d = feature_drift(X, 1.1 * X)
    assert d["rel_change"] == pytest.approx(0.1, rel=1e-12) and d["cka"] == pytest.approx(1.0, rel=1e-12)
    assert feature_drift(X, X) == {"rel_change": 0.0, "cka": pytest.approx(1.0, rel=1e-12)}


# ---------------------------------------------------------------------------------------------
# whole schedules: metrics, checkpoints, resume
# ---------------------------------------------------------------------------------------------


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_schedule_resumes_to_the_same_final_weights(tmp_path, digits):
    cfg_a = _cfg(tmp_path / "a")
    full = run_staged(cfg_a, digits)
    assert full.finished and full.resumed_from is None
    run_dir = tmp_path / "a" / "t"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["warmup", "freeze", "focus", "focus"]
    assert [r["global_epoch"] for r in rows] == [0, 1, 2, 3]
    focus = [r for r in rows if r["stage"] == "focus"]
    assert all(r["recomputed"] for r in focus) and 0 <= focus[0]["weights_auroc"] <= 1
    assert "feature_cka" not in focus[0] and 0 < focus[1]["feature_cka"] <= 1 + 1e-9  # drift since last recompute
    assert rows[1]["lr"] == pytest.approx([0.02, 0.004])  # base lr, base lr x 0.2
    assert rows[1]["trainable_params"] < rows[0]["trainable_params"]
    assert (run_dir / "DONE").is_file() and (run_dir / "freeze_report.csv").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("stage_*.pt")) == \
        ["stage_00.pt", "stage_01.pt", "stage_02.pt"]
    assert full.alpha is not None and full.alpha.shape == digits.y_train.shape

    # interrupted after stage 1, resumed in a fresh call
    cfg_b = _cfg(tmp_path / "b")
    part = run_staged(cfg_b, digits, stop_after=1)
    assert not part.finished and not (tmp_path / "b" / "t" / "DONE").exists()
    resumed = run_staged(cfg_b, digits)
    assert resumed.resumed_from == 2 and resumed.finished
    a, b = _state(full.model), _state(resumed.model)
    assert a.keys() == b.keys()
    init = _state(_model())
    moved = [k for k in a if k in init and a[k].shape == init[k].shape and not torch.equal(a[k], init[k])]
    assert len(moved) > 10  # training moved the weights, so equality below is informative
    for k in a:
        assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    assert_close(resumed.alpha, full.alpha, rtol=0, atol=0)

    # resume from any stage: redo stages 1 and 2 from the stage-0 checkpoint
    again = run_staged(cfg_b, digits, resume_from=0)
    assert again.resumed_from == 1
    for k, v in _state(again.model).items():
        assert_close(v, a[k], rtol=0, atol=0, msg=k)


def test_resume_errors(tmp_path, digits):
    stages = [{"name": "only", "trainable": ["head"], "lr": 1e-2, "epochs": 1}]
    cfg = _cfg(tmp_path, stages=stages)
    with pytest.raises(RunDirError, match="No valid checkpoint of stage 0"):
        run_staged(cfg, digits, resume_from=0)
    with pytest.raises(ConfigError, match=r"The 'resume_from' parameter of run_staged must be a stage index in 0\.\.0"):
        run_staged(cfg, digits, resume_from=3)
    run_staged(cfg, digits)
    # a checkpoint of another architecture in the run directory
    from reweight.runs import load_checked, save_checked

    p = tmp_path / "t" / "checkpoints" / "stage_00.pt"
    ck = load_checked(p)
    ck["model_name"] = "test_efficientnet"
    save_checked(p, ck)
    with pytest.raises(ConfigError, match="holds architecture 'test_efficientnet', but the config expects 'test_resnet'"):
        run_staged(cfg, digits)
    ck["model_name"] = "test_resnet"
    ck["model"]["layer4.0.conv1.weight"] = torch.zeros(3, 3)
    save_checked(p, ck)
    with pytest.raises(ConfigError, match="does not match architecture 'test_resnet'.*layer4.0.conv1.weight"):
        run_staged(cfg, digits)


def test_unknown_model_fails_before_work(tmp_path, digits):
    cfg = _cfg(tmp_path, backbone={"model": "resnet_does_not_exist"})
    with pytest.raises(ConfigError, match="must be a timm model name"):
        run_staged(cfg, digits)


def test_config_without_stages_is_not_a_staged_run(tmp_path, digits):
    with pytest.raises(ConfigError, match=r"The 'stages' parameter of run_staged's config must be a non-empty list"):
        run_staged(from_dict(RunConfig, {"out_dir": str(tmp_path)}), digits)


def test_study_configs_build_for_every_strategy(tmp_path):
    from experiments.staged import STRATEGIES, StagedConfig, _load

    study = load_config(None, [f"out={tmp_path}", "quick=true", "base.data.noise_rate=0.2",
                               "base.backbone.batch_size=32"], cls=StagedConfig)
    for st in STRATEGIES:
        cfg = _load(st, 1, study)
        assert isinstance(cfg, RunConfig)  # one schema: every override applies to every strategy
        assert cfg.seed == 1 and cfg.data.noise_rate == 0.2 and cfg.data.dataset == "digits"
        assert cfg.name == f"{st}_s1" and cfg.out_dir == str(tmp_path) and cfg.backbone.batch_size == 32
        assert cfg.features.cache_dir == str(tmp_path / ".feature_cache")
        if st == "a_head_only":
            assert cfg.stages == [] and cfg.backbone.epochs == 2  # head-only: quick shortens the warm-up
        else:
            assert cfg.stages and all(s.epochs <= 1 for s in cfg.stages)
    with pytest.raises(ConfigError, match="Unknown config key 'stages_typo'"):
        _load("b_focus", 0, load_config(None, [f"out={tmp_path}", "base.stages_typo=1"], cls=StagedConfig))
    with pytest.raises(ConfigError, match=r"The 'strategies' parameter must be a non-empty list of names from"):
        load_config(None, ["strategies=[e_nope]"], cls=StagedConfig)
    # an override in the old staged schema still works, with a deprecation message
    with pytest.warns(DeprecationWarning, match=r"batch_size -> backbone\.batch_size"):
        cfg = _load("d_full", 0, load_config(None, [f"out={tmp_path}", "base.batch_size=16"], cls=StagedConfig))
    assert cfg.backbone.batch_size == 16
    # ... and so do the study's old top-level RunConfig overrides (data.noise_rate=0.2), and a private cache
    with pytest.warns(DeprecationWarning, match=r"data -> base\.data"):
        study = load_config(None, ["data.noise_rate=0.3", f"base.features.cache_dir={tmp_path / 'c'}"],
                            cls=StagedConfig)
    cfg = _load("b_focus", 2, study)
    assert cfg.data.noise_rate == 0.3 and cfg.features.cache_dir == str(tmp_path / "c")
