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


def test_auto_dtype_is_bf16_only_where_the_hardware_has_it(tmp_path, monkeypatch):
    import ebft.config as config_module

    amd = tmp_path / "amd"
    amd.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu sse2 avx2 fma\n")
    sapphire = tmp_path / "sapphire"
    sapphire.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    graviton = tmp_path / "graviton"
    graviton.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n")
    assert not config_module.cpu_has_native_bf16(str(amd))
    assert config_module.cpu_has_native_bf16(str(sapphire))
    assert config_module.cpu_has_native_bf16(str(graviton))
    assert not config_module.cpu_has_native_bf16(str(tmp_path / "missing"))

    monkeypatch.setattr(config_module, "cpu_has_native_bf16", lambda: False)
    assert build_config({}).model.dtype == "float32"
    assert build_config({"resources": {"learner": {"gpus_per_actor": 1}}}).model.dtype == "bfloat16"
    assert build_config({"model": {"dtype": "bfloat16"}}).model.dtype == "bfloat16"  # an explicit choice stays
    monkeypatch.setattr(config_module, "cpu_has_native_bf16", lambda: True)
    assert build_config({}).model.dtype == "bfloat16"


def test_bf16_without_zero_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="learner.zero_stage to 1 or 2"):
        build_config(overrides=["model.dtype=bfloat16", "learner.zero_stage=0"])
    assert build_config(overrides=["model.dtype=float32", "learner.zero_stage=0"]).learner.zero_stage == 0
    assert build_config(overrides=["model.dtype=bfloat16", "learner.zero_stage=1"]).learner.zero_stage == 1


def test_node_resources_are_custom_and_positive():
    config = build_config({"resources": {"rollout": {"node_resources": {"rollout_node": 1}}}})
    assert config.resources.rollout.node_resources == {"rollout_node": 1.0}
    with pytest.raises(ConfigError, match=r"`resources.learner.node_resources`.*cpus_per_actor"):
        build_config({"resources": {"learner": {"node_resources": {"CPU": 2}}}})
    with pytest.raises(ConfigError, match=r"`resources.features.node_resources`.*> 0"):
        build_config(overrides=['resources.features.node_resources={"trainer_node": 0}'])


def test_overrides_into_a_list_or_a_value_say_to_set_it_whole():
    sources = {"data": {"sources": [{"path": "python_stdlib"}]}}
    with pytest.raises(ConfigError, match=r"`data.sources` is a list, not a section; set it whole"):
        build_config(sources, ["data.sources.0.path=other"])
    with pytest.raises(ConfigError, match=r"`sampling.temperature` is a float, not a section"):
        build_config({"sampling": {"temperature": 0.6}}, ["sampling.temperature.x=1"])


def test_unknown_key_inside_a_list_item_suggests_the_closest():
    with pytest.raises(
        ConfigError, match=r"unknown key `data.sources.0.txt_key`; did you mean `data.sources.text_key`"
    ):
        build_config({"data": {"sources": [{"path": "python_stdlib", "txt_key": "body"}]}})


def test_nucleus_sampling_is_refused_for_ebft_only():
    with pytest.raises(ConfigError, match=r"sampling.top_p=0.9: .*set sampling.top_p=1.0"):
        build_config({}, ["sampling.top_p=0.9"])
    assert build_config({}, ["sampling.top_p=0.9", "training.method=sft"]).sampling.top_p == 0.9


def test_a_rollout_share_of_one_gpu_needs_utilization_below_the_share():
    shared = {
        pool: {"gpus_per_actor": 0.5 if pool == "rollout" else 0.25} for pool in ("rollout", "features", "learner")
    }
    for utilization in (0.5, 0.6):
        with pytest.raises(ConfigError, match=r"rollout.gpu_memory_utilization below 0.5, e.g. 0.4"):
            build_config({"resources": shared, "rollout": {"gpu_memory_utilization": utilization}})
    assert build_config({"resources": shared, "rollout": {"gpu_memory_utilization": 0.45}}).weight_transport == (
        "object_store"
    )
    whole = {"rollout": {"gpus_per_actor": 1}, "learner": {"gpus_per_actor": 1}}
    build_config({"resources": whole, "rollout": {"gpu_memory_utilization": 0.95}})  # a GPU of its own: no share


def test_learner_ranks_on_shares_of_a_gpu_are_refused():
    with pytest.raises(ConfigError, match=r"2 learner ranks: .*Duplicate GPU.*set resources.learner.gpus_per_actor=1"):
        build_config({"resources": {"learner": {"num_actors": 2, "gpus_per_actor": 0.5}}})
    build_config({"resources": {"learner": {"num_actors": 1, "gpus_per_actor": 0.5}}})
    build_config({"resources": {"learner": {"num_actors": 2, "gpus_per_actor": 1}}})
    build_config({"resources": {"learner": {"num_actors": 2}}})  # CPU ranks
