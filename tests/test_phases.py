"""PhaseClock: seconds per named phase, nested phases, and a clean start after take()."""

import time

from qtune.phases import PhaseClock


def test_phases_accumulate_nest_and_reset():
    clock = PhaseClock("cpu")
    with clock.phase("outer"):
        with clock.phase("inner"):
            time.sleep(0.02)
        time.sleep(0.01)
    with clock.phase("inner"):
        time.sleep(0.01)
    clock.add({"triage": 0.5})
    assert clock.seconds["inner"] >= 0.03 and clock.seconds["outer"] >= 0.03
    assert clock.seconds["outer"] < clock.seconds["inner"] + 0.02  # the second inner is outside outer
    taken = clock.take()
    assert set(taken) == {"phase_seconds"} and taken["phase_seconds"]["triage"] == 0.5
    assert clock.take() == {"phase_seconds": {}}


def test_a_phase_that_raises_is_still_counted():
    clock = PhaseClock()
    try:
        with clock.phase("failing"):
            raise RuntimeError
    except RuntimeError:
        pass
    assert "failing" in clock.seconds and not clock._open
