"""Config validation: errors name the key and the fix, before any work starts."""

import pytest

from ebft.config import ConfigError, build_config, load_config


def test_defaults_follow_the_paper():
    config = build_config()
    assert config.num_blocks == 127
    assert config.sampling.temperature == 0.6 and config.sampling.num_samples == 4
    assert config.optim.betas == (0.9, 0.95) and config.model.trust_remote_code is False


def test_dotted_overrides_are_typed():
    config = build_config(
        {"sampling": {"temperature": 1.0}},
        ["sampling.temperature=0.6", "data.chunk_length=64", "reward.whitening=feature"],
    )
    assert config.sampling.temperature == 0.6 and config.data.chunk_length == 64
    assert config.reward.whitening == "feature" and config.num_blocks == (64 - 16) // 8 + 1


def test_unknown_key_suggests_the_closest_valid_one():
    with pytest.raises(ConfigError, match=r"unknown key `sampling.temprature`.*`sampling.temperature`"):
        build_config(overrides=["sampling.temprature=0.6"])
    with pytest.raises(ConfigError, match=r"unknown key `sampeling`.*`sampling`"):
        build_config({"sampeling": {}})


def test_wrong_types_name_the_key():
    with pytest.raises(ConfigError, match=r"`sampling.num_samples`.*'four'"):
        build_config(overrides=["sampling.num_samples=four"])
    with pytest.raises(ConfigError, match=r"`reward.whitening`"):
        build_config(overrides=["reward.whitening=zca"])


def test_impossible_geometry_is_rejected_with_a_fix():
    with pytest.raises(ConfigError, match=r"not a multiple of sampling.stride=8; e.g. set data.chunk_length=1016"):
        build_config(overrides=["data.chunk_length=1020"])
    with pytest.raises(ConfigError, match="n >= 2"):
        build_config(overrides=["sampling.num_samples=1"])
    with pytest.raises(ConfigError, match="shorter than"):
        build_config(overrides=["data.chunk_length=10"])


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        build_config(overrides=["sampling.temperature"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    path = tmp_path / "c.yaml"
    path.write_text("sampling:\n  num_samples: 6\n")
    assert load_config(path, ["sampling.temperature=1.0"]).sampling.num_samples == 6
