"""`trainer.callbacks`: a user's callbacks from config, instantiated by Hydra before any work,
each refusal naming the list entry and what was expected. (Their hooks in a real 2-rank run,
and their state across a resume: tests/integration/test_observability.py.)"""

import pytest

from ava.config import ConfigError
from ava.observe import Callback, CallbackList
from ava.train.run import config_callbacks


class Counter(Callback):
    name = "counter"

    def __init__(self, start: int = 0) -> None:
        self.n = start

    def pre_step(self, state) -> None:
        self.n += 1

    def state_dict(self):
        return {"n": self.n}


def test_a_callback_is_built_with_its_arguments():
    (cb,) = config_callbacks([{"_target_": f"{__name__}.Counter", "start": 5}])
    assert isinstance(cb, Counter) and cb.n == 5
    callbacks = CallbackList([cb])
    callbacks.pre_step(None)
    assert callbacks.state_dict() == {"counter": {"n": 6}}


@pytest.mark.parametrize(("spec", "message"), [
    ("tests.Counter", "trainer.callbacks[0] must be a mapping with _target_: module.ClassName "
                      "(got 'tests.Counter')"),
    ({"start": 1}, "trainer.callbacks[0] must be a mapping with _target_: module.ClassName "
                   "(got {'start': 1})"),
    ({"_target_": "no_such_module.Thing"}, "trainer.callbacks[0]: cannot instantiate no_such_module.Thing: "
                                           "ModuleNotFoundError(\"No module named 'no_such_module'\")"),
    ({"_target_": f"{__name__}.Counter", "stop": 1},
     f"trainer.callbacks[0]: cannot instantiate {__name__}.Counter: TypeError: "
     "Counter.__init__() got an unexpected keyword argument 'stop'"),
    ({"_target_": "collections.OrderedDict"},
     "trainer.callbacks[0]: collections.OrderedDict is a OrderedDict, not an ava.observe.Callback"),
])
def test_bad_entries_are_refused_naming_the_entry(spec, message):
    with pytest.raises(ConfigError) as err:
        config_callbacks([spec])
    assert str(err.value) == message


def test_two_callbacks_with_one_name_are_refused():
    # checkpoint state is keyed by name: two "counter"s would overwrite each other's state
    with pytest.raises(ValueError, match=r"callbacks share the name\(s\) \['counter'\]"):
        CallbackList([Counter(), Counter()])


def test_unknown_hooks_are_attribute_errors():
    with pytest.raises(AttributeError):
        CallbackList([Counter()].copy()).no_such_hook  # noqa: B018
