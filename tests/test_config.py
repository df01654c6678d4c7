"""Dataclass-backed configs: YAML round trip, dotted overrides, unknown keys, types and ranges."""

import hashlib
import json

import pytest
import yaml

from reweight.config import BackboneConfig, DataConfig, RunConfig, apply_overrides, config_hash, from_dict, load_config, to_dict
from reweight.errors import ConfigError


def test_defaults_round_trip_through_yaml(tmp_path):
    cfg = RunConfig()
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_config(p) == cfg
    assert config_hash(load_config(p)) == config_hash(cfg)


def test_shipped_main_config_loads():
    from experiments.cli import DEFAULT_CONFIG

    cfg = load_config(DEFAULT_CONFIG)
    assert cfg.data.noise_rate == 0.4 and cfg.hypergrad.method == "cg"


def test_dotted_overrides():
    cfg = load_config(None, ["head.lam=0.3", "outer.steps=7", "data.noise=asymmetric", "hypergrad.options={rtol: 1e-4}"])
    assert cfg.head.lam == 0.3 and cfg.outer.steps == 7 and cfg.data.noise == "asymmetric"
    assert cfg.hypergrad.options == {"rtol": 1e-4}
    assert config_hash(cfg) != config_hash(RunConfig())
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2"]) == {"a": {"b": 1, "c": 2}}


def test_unknown_key_names_valid_keys():
    with pytest.raises(ConfigError, match=r"Unknown config key 'head.lamda'. Valid keys under 'head': lam, bias"):
        load_config(None, ["head.lamda=1"])
    with pytest.raises(ConfigError, match=r"Unknown config key 'bogus'. Valid keys: name, seed"):
        from_dict(RunConfig, {"bogus": 1})


def test_wrong_type_names_expected_type():
    with pytest.raises(ConfigError, match=r"'outer.steps' parameter must be int. Got 'ten'"):
        load_config(None, ["outer.steps=ten"])
    with pytest.raises(ConfigError, match=r"'head.bias' parameter must be bool"):
        load_config(None, ["head.bias=3"])
    with pytest.raises(ConfigError, match=r"'data.noise' parameter must be one of 'none', 'symmetric', 'asymmetric'"):
        load_config(None, ["data.noise=gaussian"])
    with pytest.raises(ConfigError, match=r"'head' section must be a mapping"):
        from_dict(RunConfig, {"head": 3})


def test_out_of_range_names_the_range():
    with pytest.raises(ConfigError, match=r"'head.lam' parameter must be > 0"):
        load_config(None, ["head.lam=0"])
    with pytest.raises(ConfigError, match=r"'data.noise_rate' parameter must be in \[0, 1\)"):
        load_config(None, ["data.noise_rate=1.5"])
    with pytest.raises(ConfigError, match=r"'outer.checkpoint_every' parameter must be >= 1"):
        load_config(None, ["outer.checkpoint_every=0"])


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["head.lam"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at top level"):
        load_config(tmp_path / "list.yaml")


# ---------------------------------------------------------------------------------------------
# one schema: stages in RunConfig, old staged YAML
# ---------------------------------------------------------------------------------------------

OLD_STAGED_YAML = """\
name: old
model: test_efficientnet
pretrained_file: null
batch_size: 32
eval_batch_size: 256
standardize: false
outer: {steps: 30}
stages:
  - {name: warmup, trainable: [all], lr: 2.0e-3, epochs: 3, restore_best: true}
  - {name: focus, trainable: [head], epochs: 1, loss: reweighted}
"""


def test_old_staged_yaml_loads_into_runconfig_with_a_deprecation_message(tmp_path, caplog):
    from reweight.config import StageConfig

    p = tmp_path / "old.yaml"
    p.write_text(OLD_STAGED_YAML)
    with pytest.warns(DeprecationWarning, match=r"model -> backbone\.model, pretrained_file -> backbone\.pretrained_file, "
                      r"batch_size -> backbone\.batch_size, eval_batch_size -> features\.batch_size, "
                      r"standardize -> features\.standardize"):
        cfg = load_config(p, ["outer.lr=0.05"])
    assert "Deprecated config keys" in caplog.text and "model -> backbone.model" in caplog.text  # also logged
    assert isinstance(cfg, RunConfig) and cfg.backbone.model == "test_efficientnet" and cfg.backbone.batch_size == 32
    assert cfg.features.batch_size == 256 and cfg.features.standardize is False and cfg.backbone.pretrained_file is None
    assert cfg.outer.steps == 30 and cfg.outer.lr == 0.05
    assert [s.name for s in cfg.stages] == ["warmup", "focus"] and all(isinstance(s, StageConfig) for s in cfg.stages)
    # the same run in the new schema is the same config
    new = load_config(None, ["name=old", "backbone={model: test_efficientnet, batch_size: 32}",
                             "features={batch_size: 256, standardize: false}", "outer={steps: 30, lr: 0.05}",
                             "stages=" + json.dumps([to_dict(s) for s in cfg.stages])])
    assert new == cfg and config_hash(new) == config_hash(cfg)


def test_old_and_new_key_together_is_an_error():
    with pytest.raises(ConfigError, match=r"sets both the old key 'model' and 'backbone\.model'"):
        from_dict(RunConfig, {"model": "test_resnet", "backbone": {"model": "test_resnet"}})
    with pytest.raises(ConfigError, match=r"The 'features' section must be a mapping"):
        from_dict(RunConfig, {"standardize": True, "features": 3})


def test_stages_in_runconfig():
    cfg = load_config(None, ["stages=[{name: a, trainable: [head], patience: 2, min_epochs: 1}]"])
    assert cfg.stages[0].patience == 2 and cfg.stages[0].min_epochs == 1 and cfg.stages[0].restore_best is False
    assert config_hash(cfg) != config_hash(RunConfig())
    with pytest.raises(ConfigError, match=r"The 'stages' parameter must be a list of stages with unique names"):
        load_config(None, ["stages=[{name: a}, {name: a}]"])
    with pytest.raises(ConfigError, match=r"The 'stages\[a\]\.min_epochs' parameter must be >= 0"):
        load_config(None, ["stages=[{name: a, min_epochs: -1}]"])
    # a head-only run (no stages) hashes as before the field existed; so do the data-source keys at their
    # defaults, and backbone.allow_chance never enters the hash (it decides whether a run goes on)
    d = to_dict(RunConfig())
    assert d.pop("stages") == []
    for k in ("name", "out_dir"):
        d.pop(k)
    for k in ("train_dir", "trusted_dir", "test_dir", "train_file", "trusted_file", "test_file", "label_column",
              "id_column", "name", "root", "image_size", "normalize", "labels_file", "labels_key", "clean_labels_key"):
        d["data"].pop(k)
    d["backbone"].pop("allow_chance")
    assert config_hash(RunConfig(backbone=BackboneConfig(allow_chance=True))) == config_hash(RunConfig())
    assert config_hash(RunConfig(data=DataConfig(image_size=8, dataset="torchvision", name="MNIST", root="r"))) \
        != config_hash(RunConfig(data=DataConfig(dataset="torchvision", name="MNIST", root="r")))
    assert config_hash(RunConfig()) == hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def test_warmup_stage_of_the_backbone_config():
    from reweight.config import BackboneConfig

    st = BackboneConfig(epochs=7, patience=2, min_epochs=4, lr=1e-3, weight_decay=1e-5).warmup_stage()
    assert (st.trainable, st.optimizer, st.loss, st.lr, st.epochs) == (["all"], "adamw", "ce", 1e-3, 7)
    assert (st.weight_decay, st.decay_norm_bias) == (1e-5, True)  # decay on every parameter, as the warm-up did
    assert (st.patience, st.min_epochs, st.restore_best) == (2, 4, True)


def test_renamed_head_tol_loads_as_grad_tol_with_a_deprecation_message():
    with pytest.warns(DeprecationWarning, match=r"head.tol -> head.grad_tol"):
        cfg = load_config(None, ["head.tol=1e-7"])
    assert cfg.head.grad_tol == 1e-7
    with pytest.raises(ConfigError, match="sets both the old key 'head.tol' and 'head.grad_tol'"):
        load_config(None, ["head.tol=1e-7", "head.grad_tol=1e-6"])


def test_a_section_override_lays_over_the_fields_own_default():
    """A study's ``base: RunConfig`` default (threads=1, float64 head) survives an override of another key."""
    from dataclasses import dataclass, field

    from reweight.config import HeadConfig

    @dataclass(frozen=True)
    class Study:
        base: RunConfig = field(default_factory=lambda: RunConfig(threads=1, head=HeadConfig(dtype="float64")))

    cfg = load_config(None, ["base.data.dataset=digits", "base.head.lam=0.3"], cls=Study)
    assert (cfg.base.threads, cfg.base.head.dtype, cfg.base.head.lam, cfg.base.data.dataset) == (1, "float64", 0.3, "digits")
    assert load_config(None, ["base.threads=2", "base.head.dtype=float32"], cls=Study).base.head.dtype == "float32"
    assert load_config(None, [], cls=Study).base == Study().base
    # a plain section (default_factory=HeadConfig) still starts from the class defaults, old keys included
    with pytest.warns(DeprecationWarning, match=r"head\.tol -> head\.grad_tol"):
        assert load_config(None, ["head.tol=1e-3"]).head.grad_tol == 1e-3
