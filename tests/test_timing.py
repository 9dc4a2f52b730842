"""The run timer: every second of a ``with timer.phase(...)`` block billed to one named key."""

import pytest

from qat_jax.train.timing import Timer


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now

    def tick(self, seconds):
        self.now += seconds


def test_phases_accumulate_into_their_keys_in_the_order_they_end():
    clock = FakeClock()
    timer = Timer(clock)
    with timer.phase("startup"):
        clock.tick(3.0)
    for _ in range(2):
        with timer.phase("fp_train"):
            clock.tick(1.5)
    clock.tick(10.0)  # outside every phase: billed to none
    assert timer.seconds == {"startup": 3.0, "fp_train": 3.0}
    assert list(timer.seconds) == ["startup", "fp_train"]
    assert timer.elapsed() == 16.0


def test_a_nested_phase_pauses_the_one_around_it():
    clock = FakeClock()
    timer = Timer(clock)
    with timer.phase("transitions"):
        clock.tick(1.0)
        with timer.phase("qat_start"):
            clock.tick(4.0)
        clock.tick(2.0)
    with timer.phase("checkpoints"):
        clock.tick(0.5)
    # qat_start ended first, so it comes first (summary.json's order); nothing is counted twice.
    assert timer.seconds == {"qat_start": 4.0, "transitions": 3.0, "checkpoints": 0.5}
    assert list(timer.seconds) == ["qat_start", "transitions", "checkpoints"]
    assert sum(timer.seconds.values()) == timer.elapsed()


def test_a_phase_that_raises_is_still_billed_and_elapsed_adds_earlier_sessions():
    clock = FakeClock()
    timer = Timer(clock)
    timer.elapsed_before = 60.0  # a resumed run: its checkpoint's elapsed seconds
    with pytest.raises(RuntimeError), timer.phase("qat_train"):
        clock.tick(2.0)
        raise RuntimeError("a step failed")
    with timer.phase("qat_train"):
        clock.tick(1.0)
    assert timer.seconds == {"qat_train": 3.0}
    assert timer.elapsed() == 63.0
