"""Dataclass-backed configs: YAML round trip, dotted overrides, unknown keys, types and ranges."""

import pytest
import yaml

from reweight.config import RunConfig, apply_overrides, config_hash, from_dict, load_config, to_dict
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
