"""Latency outlier detection (coordinator/outliers.py): pure logic on given times."""

from __future__ import annotations

import random

import pytest

from coordinator.outliers import LatencyOutliers, OutlierPolicy

POLICY = OutlierPolicy(
    factor=3.0, min_floor_s=0.005, min_samples=5, window_s=30.0, max_ejected_fraction=0.5
)


def feed(
    detector: LatencyOutliers, latencies: dict[str, float], now: float = 0.0, n: int = 5
) -> None:
    """``n`` samples of each node's latency (seconds per token) at ``now``."""
    for _ in range(n):
        for node_id, seconds in latencies.items():
            detector.record(node_id, seconds, now)


def test_the_ten_times_slower_node_among_three_is_found() -> None:
    detector = LatencyOutliers(POLICY)
    feed(detector, {"a": 0.02, "b": 0.02, "c": 0.2})
    assert detector.outliers(["a", "b", "c"], now=1.0) == ["c"]


def test_the_ten_times_slower_node_among_four_is_found_with_noise() -> None:
    rng = random.Random(7)
    detector = LatencyOutliers(POLICY)
    for i in range(20):
        for node_id in ("a", "b", "c"):
            detector.record(node_id, 0.02 * rng.uniform(0.7, 1.5), float(i))
        detector.record("slow", 0.2 * rng.uniform(0.7, 1.5), float(i))
    assert detector.outliers(["a", "b", "c", "slow"], now=20.0) == ["slow"]


def test_none_when_all_are_similar_even_with_noisy_samples() -> None:
    rng = random.Random(11)
    detector = LatencyOutliers(POLICY)
    for i in range(64):
        for node_id, base in (("a", 0.02), ("b", 0.025), ("c", 0.03), ("d", 0.035)):
            # Mostly near the base, with the odd 10x spike (a long prompt, a GC pause).
            spike = 10.0 if rng.random() < 0.1 else 1.0
            detector.record(node_id, base * rng.uniform(0.5, 2.0) * spike, float(i) * 0.1)
    assert detector.outliers(["a", "b", "c", "d"], now=7.0) == []


def test_min_samples_is_respected() -> None:
    detector = LatencyOutliers(POLICY)
    feed(detector, {"a": 0.02, "b": 0.02})
    feed(detector, {"c": 0.2}, n=4)
    assert detector.typical("c", 1.0) is None
    assert detector.outliers(["a", "b", "c"], now=1.0) == []
    detector.record("c", 0.2, 1.0)
    assert detector.typical("c", 1.0) == pytest.approx(0.2)
    assert detector.outliers(["a", "b", "c"], now=1.0) == ["c"]


def test_peers_without_enough_samples_are_no_yardstick() -> None:
    detector = LatencyOutliers(POLICY)
    feed(detector, {"slow": 0.2})
    feed(detector, {"a": 0.02, "b": 0.02}, n=4)
    assert detector.outliers(["a", "b", "slow"], now=1.0) == []


def test_samples_past_the_window_expire() -> None:
    detector = LatencyOutliers(POLICY)
    feed(detector, {"a": 0.02, "b": 0.02, "c": 0.2}, now=0.0)
    # Exactly at the window's edge the samples still count.
    assert detector.typical("c", 30.0) == pytest.approx(0.2)
    # The slow samples age out; fresh ones on the peers alone do not judge c.
    feed(detector, {"a": 0.02, "b": 0.02}, now=31.0)
    assert detector.typical("c", 31.0) is None
    assert detector.outliers(["a", "b", "c"], now=31.0) == []
    # c recovered: its new samples are all that count.
    feed(detector, {"c": 0.021}, now=32.0)
    assert detector.outliers(["a", "b", "c"], now=32.0) == []


def test_old_samples_give_way_to_new_ones_within_the_cap() -> None:
    policy = OutlierPolicy(min_samples=5, max_samples=8)
    detector = LatencyOutliers(policy)
    feed(detector, {"a": 0.02, "b": 0.02}, n=8)
    feed(detector, {"c": 0.02}, n=100)
    feed(detector, {"c": 0.2}, n=8)  # the newest 8 are all slow
    assert detector.outliers(["a", "b", "c"], now=0.0) == ["c"]


def test_two_slow_of_four_with_half_are_both_ejected_worst_first() -> None:
    detector = LatencyOutliers(POLICY)
    feed(detector, {"a": 0.02, "b": 0.02, "s1": 0.15, "s2": 0.3})
    assert detector.outliers(["a", "b", "s1", "s2"], now=0.0) == ["s2", "s1"]


@pytest.mark.parametrize(
    ("fraction", "expected"),
    [(0.5, ["s3", "s2", "s1"]), (0.4, ["s3", "s2"]), (0.25, ["s3"]), (0.1, [])],
)
def test_the_fraction_caps_ejections_rounding_down_worst_first(
    fraction: float, expected: list[str]
) -> None:
    # Six judged nodes, three of them slow: each slow one's peers' median is 0.01, so all
    # three are outliers; floor(fraction * 6) of them go, the slowest first.
    detector = LatencyOutliers(OutlierPolicy(max_ejected_fraction=fraction))
    feed(detector, {"a": 0.01, "b": 0.01, "c": 0.01, "s1": 0.1, "s2": 0.2, "s3": 0.3})
    assert detector.outliers(["a", "b", "c", "s1", "s2", "s3"], now=0.0) == expected


def test_two_slow_among_three_make_each_other_look_normal() -> None:
    # The yardstick is the median of the others: with three nodes, two slow ones cover for
    # each other, and only the clearly worst can stand out.
    detector = LatencyOutliers(POLICY)
    feed(detector, {"a": 0.01, "s1": 0.1, "s2": 0.11})
    assert detector.outliers(["a", "s1", "s2"], now=0.0) == []


def test_never_all_nodes_even_with_fraction_one() -> None:
    policy = OutlierPolicy(max_ejected_fraction=1.0)
    detector = LatencyOutliers(policy)
    feed(detector, {"a": 0.01, "b": 0.1})
    assert detector.outliers(["a", "b"], now=0.0) == ["b"]
    # A fraction of zero disables ejection.
    off = LatencyOutliers(OutlierPolicy(max_ejected_fraction=0.0))
    feed(off, {"a": 0.01, "b": 0.01, "c": 0.1})
    assert off.outliers(["a", "b", "c"], now=0.0) == []


def test_with_two_nodes_the_slower_goes_only_past_factor_times_the_other() -> None:
    detector = LatencyOutliers(POLICY)
    feed(detector, {"a": 0.02, "b": 0.059})  # 2.95x: stays
    assert detector.outliers(["a", "b"], now=0.0) == []
    detector = LatencyOutliers(POLICY)
    feed(detector, {"a": 0.02, "b": 0.061})  # 3.05x: out, and a stays
    assert detector.outliers(["a", "b"], now=0.0) == ["b"]


def test_a_lone_judged_node_is_never_an_outlier() -> None:
    detector = LatencyOutliers(POLICY)
    feed(detector, {"a": 10.0})
    assert detector.outliers(["a"], now=0.0) == []
    assert detector.outliers(["a", "unknown"], now=0.0) == []
    assert detector.outliers([], now=0.0) == []


def test_only_candidates_are_judged_or_used_as_peers() -> None:
    detector = LatencyOutliers(POLICY)
    feed(detector, {"a": 0.02, "b": 0.02, "c": 0.2, "down": 0.001})
    # "down" is not healthy now: it is neither ejected nor a yardstick.
    assert detector.outliers(["a", "b"], now=0.0) == []
    assert detector.outliers(["a", "b", "c", "c"], now=0.0) == ["c"]


def test_forget_drops_a_node() -> None:
    detector = LatencyOutliers(POLICY)
    feed(detector, {"a": 0.02, "b": 0.02, "c": 0.2})
    detector.forget("c")
    detector.forget("never-seen")
    assert detector.typical("c", 0.0) is None
    assert detector.outliers(["a", "b", "c"], now=0.0) == []


def test_samples_are_cleared_once_reported() -> None:
    detector = LatencyOutliers(POLICY)
    feed(detector, {"a": 0.02, "b": 0.02, "c": 0.2})
    assert detector.outliers(["a", "b", "c"], now=0.0) == ["c"]
    assert detector.typical("c", 0.0) is None
    assert detector.outliers(["a", "b", "c"], now=0.0) == []
    # Re-admitted and still slow: judged again after min_samples fresh samples.
    feed(detector, {"c": 0.2}, now=1.0, n=4)
    assert detector.outliers(["a", "b", "c"], now=1.0) == []
    detector.record("c", 0.2, 1.0)
    assert detector.outliers(["a", "b", "c"], now=1.0) == ["c"]
    # The peers keep their samples.
    assert detector.typical("a", 1.0) == pytest.approx(0.02)


def test_the_floor_keeps_microsecond_noise_in() -> None:
    detector = LatencyOutliers(POLICY)
    # 3.5x slower but only 250 microseconds more per token: below the 5 ms floor.
    feed(detector, {"a": 100e-6, "b": 100e-6, "c": 100e-6, "d": 350e-6})
    assert detector.outliers(["a", "b", "c", "d"], now=0.0) == []
    no_floor = LatencyOutliers(OutlierPolicy(min_floor_s=0.0))
    feed(no_floor, {"a": 100e-6, "b": 100e-6, "c": 100e-6, "d": 350e-6})
    assert no_floor.outliers(["a", "b", "c", "d"], now=0.0) == ["d"]


def test_zero_latency_peers_do_not_break_the_ratio() -> None:
    detector = LatencyOutliers(POLICY)
    feed(detector, {"a": 0.0, "b": 0.0, "c": 0.0, "d": 0.05})
    assert detector.outliers(["a", "b", "c", "d"], now=0.0) == ["d"]


def test_the_median_resists_a_few_slow_samples() -> None:
    detector = LatencyOutliers(POLICY)
    feed(detector, {"a": 0.02, "b": 0.02})
    feed(detector, {"c": 0.02}, n=3)
    feed(detector, {"c": 2.0}, n=2)
    assert detector.outliers(["a", "b", "c"], now=0.0) == []


def test_invalid_samples_are_ignored() -> None:
    detector = LatencyOutliers(POLICY)
    for bad in (float("nan"), float("inf"), -1.0):
        detector.record("a", bad, 0.0)
    assert detector.typical("a", 0.0) is None
    feed(detector, {"a": 0.02})
    detector.record("a", float("nan"), 0.0)
    assert detector.typical("a", 0.0) == pytest.approx(0.02)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"factor": 0.5},
        {"min_floor_s": -1.0},
        {"min_samples": 0},
        {"window_s": 0.0},
        {"max_ejected_fraction": 1.5},
        {"max_samples": 4, "min_samples": 5},
    ],
)
def test_invalid_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        OutlierPolicy(**kwargs)  # type: ignore[arg-type]
