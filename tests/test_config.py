import pytest

from memcompile import MemtrainConfig, VeLoRAConfig
from memcompile.config import to_config


def test_defaults_and_dict_forms_agree():
    nested = to_config({"activation": "velora", "velora": {"num_groups": 16, "scale": 0.1}})
    dotted = to_config({"velora.num_groups": 16, "velora.scale": 0.1})
    obj = MemtrainConfig(velora=VeLoRAConfig(num_groups=16, scale=0.1))
    assert nested == dotted == obj
    assert nested.velora.num_groups == 16 and nested.compiler == "inductor" and nested.partitioner == "mincut"
    assert to_config(None) == MemtrainConfig()
    assert to_config(obj) is obj


@pytest.mark.parametrize("options, key, valid", [
    ({"activaton": "velora"}, "'activaton'", "activation"),
    ({"activation": "lora"}, "'activation'", "'velora' | 'compact' | 'none'"),
    ({"compiler": "eager"}, "'compiler'", "'inductor' | 'aot_eager'"),
    ({"partitioner": "greedy"}, "'partitioner'", "'mincut' | 'default'"),
    ({"velora": {"groups": 4}}, "'velora.groups'", "velora.num_groups"),
    ({"velora.num_groups": 0}, "'velora.num_groups'", "an int >= 1"),
    ({"velora.init": "svd"}, "'velora.init'", "'batch_average_once'"),
    ({"compact.rank": 1.5}, "'compact.rank'", "ratio"),
    ({"compact.rank": 0}, "'compact.rank'", "ratio"),
    ({"compact.refresh": 0}, "'compact.refresh'", "an int >= 1"),
    ({"targets": []}, "'targets'", "module-name patterns"),
    ({"lora.r_max": 0}, "'lora.r_max'", "an int >= 1"),
    ({"nope.x": 1}, "'nope.x'", "velora"),
])
def test_bad_options_name_the_key_and_the_valid_choices(options, key, valid):
    with pytest.raises(ValueError) as e:
        to_config(options)
    assert key in str(e.value) and valid in str(e.value)


def test_config_is_frozen():
    cfg = MemtrainConfig()
    with pytest.raises(Exception):
        cfg.activation = "none"
    assert cfg.replace(activation="none").activation == "none"


def test_default_targets_follow_the_method():
    assert "lora_A" in MemtrainConfig(activation="velora").target_patterns
    assert MemtrainConfig(activation="compact").target_patterns == ("*",)
    assert "o_proj" in MemtrainConfig(activation="compact").exclude_patterns
    assert "o_proj" not in MemtrainConfig(activation="velora").exclude_patterns
    assert MemtrainConfig(targets="q_proj").target_patterns == ("q_proj",)
