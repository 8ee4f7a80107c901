"""DeepSpeed is checked once, before any process group: a release outside the tested range is
refused with the version, the range and the command that fixes it."""

import deepspeed
import pytest

from ava.config import ConfigError
from ava.train.ds_compat import TESTED_RANGE, check_deepspeed, missing_internals


def test_installed_deepspeed_is_in_range_and_has_every_internal():
    low, high = TESTED_RANGE
    assert low <= type(low)(deepspeed.__version__) < high
    assert missing_internals() == []
    check_deepspeed()


@pytest.mark.parametrize("version", ["0.18.0", "0.20.0"])
def test_a_release_outside_the_range_is_refused_with_the_fix(version):
    with pytest.raises(ConfigError) as err:
        check_deepspeed(version)
    assert str(err.value) == (
        f"DeepSpeed {version} is installed; Ava is tested with deepspeed>=0.19.8,<0.20 (it uses "
        "DeepSpeed internals that change between releases): pip install 'deepspeed>=0.19.8,<0.20'")
