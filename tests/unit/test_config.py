"""Every YAML of every config group composes and validates; bad values fail naming the key."""

import pytest
from hydra.errors import ConfigCompositionException

from ava.config import ConfigError, compose, conf_dir, model_preset, to_object

GROUPS = sorted(p.name for p in conf_dir().iterdir() if p.is_dir())
# options that are refused alone, naming what is missing, and valid with it
NEEDS_INPUT = {
    ("data", "files"): (["data.sources=[{path: corpus.txt}]"], "names no source"),  # your files only
    ("data", "chat_files"): (["data.sources=[{path: chats.jsonl}]"], "names no source"),
    ("model", "nano"): (["data.seq_len=64"], "data.seq_len=256 exceeds model.max_seq_len=128"),
}


@pytest.mark.parametrize(
    ("group", "option"),
    [(g, f.stem) for g in GROUPS for f in sorted((conf_dir() / g).glob("*.yaml"))],
)
def test_every_config_composes_and_validates(group, option):
    override = f"{group}={option}"
    needs, refusal = NEEDS_INPUT.get((group, option), ([], ""))
    if needs:
        with pytest.raises(ConfigError, match=refusal):
            to_object(compose([override]))
    cfg = to_object(compose([override, *needs]))
    assert cfg.model.hidden_size % cfg.model.num_heads == 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_heads": 5}, "model.hidden_size=64 must be divisible by model.num_heads=5 (or set model.head_dim)"),
        ({"num_kv_heads": 3}, "model.num_kv_heads=3 must divide model.num_heads=4"),
        ({"num_kv_heads": 0}, "model.num_kv_heads=0 must be a positive integer or null"),
        ({"head_dim": 15}, "model.head_dim=15 (hidden_size/num_heads unless set) must be even for rotary embeddings"),
        ({"qk_norm": "layer"}, "model.qk_norm='layer' is not supported; expected one of ['none', 'head', 'full']"),
        ({"router_score": "tanh"}, "model.router_score='tanh' is not supported; expected one of "
                                   "['softmax', 'sigmoid']"),
        ({"dense_layers": [0, 2]}, "model.dense_layers=[0, 2]: [2] are not layer indices 0..1"),
        ({"first_dense_layers": 3}, "model.first_dense_layers=3 exceeds model.num_layers=2"),
        ({"shared_expert_gate": True}, "model.shared_expert_gate=true needs model.shared_experts > 0"),
        ({"routed_scaling_factor": 0.0}, "model.routed_scaling_factor=0.0 must be positive"),
        ({"aux_loss_scope": "token"}, "model.aux_loss_scope='token' is not supported; expected one of "
                                      "['batch', 'sequence']"),
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


def _leaves(node, prefix=""):
    """(dotted key, value) of every leaf of a plain dict (lists are leaves)."""
    for key, value in node.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _select(cfg, dotted):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.select(cfg, dotted)}))["v"]


def test_every_default_is_stated_once():
    """A group file sets only what differs from its schema, and an experiment only what differs from
    the groups it selects: a restated default is a second place to keep in sync (and to drift)."""
    import yaml

    restated = []
    for group in (g for g in GROUPS if g != "hydra"):
        for path in sorted((conf_dir() / group).glob("*.yaml")):
            raw = yaml.safe_load(path.read_text()) or {}
            selected = [o for o in raw.pop("defaults", []) if isinstance(o, dict)]
            if group == "experiment":  # against the configuration it starts from
                picks = [f"{k.split('/')[-1]}={v}" for o in selected for k, v in o.items()]
                base = compose(picks)
                for key, value in _leaves(raw):
                    if _select(base, key) == value:
                        restated.append(f"{path.name}: {key}={value!r}")
                continue
            defaults = schema_defaults(group)
            for key, value in _leaves(raw):
                if key in defaults and defaults[key] == value:
                    restated.append(f"{group}/{path.name}: {key}={value!r}")
    assert not restated, "values equal to the default they would get anyway: " + "; ".join(restated)


def schema_defaults(group):
    """The schema defaults of a group, flattened (MISSING fields left out)."""
    import dataclasses

    from omegaconf import MISSING

    import ava.config

    schema = {f.name: f.type for f in dataclasses.fields(ava.config.AvaConfig)}[group]
    cls = getattr(ava.config, schema)

    def walk(klass, prefix=""):
        out = {}
        for f in dataclasses.fields(klass):
            if f.default is not dataclasses.MISSING:
                if f.default != MISSING:
                    out[prefix + f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                value = f.default_factory()  # type: ignore[misc]
                if dataclasses.is_dataclass(value):
                    out.update(walk(type(value), f"{prefix}{f.name}."))
                else:
                    out[prefix + f.name] = value
        return out

    return walk(cls)
