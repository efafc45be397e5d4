"""KL controllers against Ziegler et al. (2019) eq. 2, computed by hand."""

import pytest

from ppo_fast import AdaptiveKLController, FixedKLController


@pytest.mark.parametrize("current", [0.0, 3.0, 6.0, 6.6, 9.0, 100.0])
def test_adaptive_update(current):
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(current, n_steps=256)
    e = min(max(current / 6.0 - 1, -0.2), 0.2)
    assert ctl.value == pytest.approx(0.2 * (1 + e * 256 / 10000), rel=1e-12)


def test_adaptive_state_round_trip_and_bad_kl():
    ctl = AdaptiveKLController(0.1, 4.0, 100)
    ctl.update(8.0, 10)
    other = AdaptiveKLController(1.0, 1.0, 1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.state_dict() == ctl.state_dict()
    with pytest.raises(ValueError, match="current KL must be finite"):
        ctl.update(float("nan"), 10)


def test_fixed():
    ctl = FixedKLController(0.3)
    ctl.update(50.0, 1000)
    assert ctl.value == 0.3
