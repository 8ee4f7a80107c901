"""Every YAML of every config group composes and validates; bad values fail naming the key."""

import pytest
from hydra.errors import ConfigCompositionException

from ava.config import ConfigError, compose, conf_dir, model_preset, to_object

GROUPS = sorted(p.name for p in conf_dir().iterdir() if p.is_dir())
NEEDS_INPUT = {("data", "files"): ["data.sources=[{path: corpus.txt}]"]}  # "your files only"


@pytest.mark.parametrize(
    ("group", "option"),
    [(g, f.stem) for g in GROUPS for f in sorted((conf_dir() / g).glob("*.yaml"))],
)
def test_every_config_composes_and_validates(group, option):
    override = f"{group}={option}"
    needs = NEEDS_INPUT.get((group, option), [])
    if needs:  # refused without the user's part, naming it, then valid with it
        with pytest.raises(Exception, match="names no source"):
            to_object(compose([override]))
    cfg = to_object(compose([override, *needs]))
    assert cfg.model.hidden_size % cfg.model.num_heads == 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_heads": 5}, "model.hidden_size=64 must be divisible by model.num_heads=5"),
        ({"top_k": 5}, "model.top_k=5 must not exceed model.num_experts=4"),
        ({"overflow": "spill"}, "model.overflow='spill' is not supported; expected one of "
                                "['drop', 'next_best', 'residual']"),
        ({"activation": "swiglu"}, "model.activation='swiglu' experts have no biases; set model.bias=false"),
        ({"capacity_factor": -1.0}, "model.capacity_factor=-1.0 must be positive, or null for dropless routing"),
    ],
)
def test_invalid_model_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        model_preset("nano", **overrides)
    assert str(err.value) == message


def test_unknown_key_and_wrong_type_fail_in_hydra():
    with pytest.raises(ConfigCompositionException, match="num_expertz"):
        compose(["model.num_expertz=4"])
    with pytest.raises(ConfigCompositionException, match="hidden_size"):
        compose(["model.hidden_size=abc"])
