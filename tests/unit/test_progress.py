"""The progress meter: when an event is due, its rate and ETA; and the words for sizes and durations."""

from __future__ import annotations

from gateway.models.progress import ProgressMeter, human_duration, human_size


def test_progress_is_throttled_by_time_and_by_share_of_the_total() -> None:
    total = 1_000_000
    meter = ProgressMeter(total, 0, 0.0, interval=0.5, step=0.01)
    emitted = []
    now = 0.0
    for done in range(1000, total + 1, 1000):  # 1000 small chunks, 1 ms apart: one event per 1 %
        now += 0.001
        details = meter.update(done, now)
        if details is not None:
            emitted.append(details["bytes"])
    assert len(emitted) == 100
    assert emitted[0] == 10_000 and emitted[-1] == total
    assert meter.finish(total, now) is None  # the last event already said 100 %

    slow = ProgressMeter(total, 0, 0.0, interval=0.5, step=0.01)
    ticks = [slow.update(done, done * 0.1) for done in range(1, 21)]  # 1 byte per 0.1 s: time decides
    assert sum(t is not None for t in ticks) == 4


def test_progress_rate_and_eta_follow_the_clock() -> None:
    meter = ProgressMeter(1000, 200, 10.0, interval=0.5, step=0.01)  # 200 bytes were already on disk
    details = meter.update(400, 12.0)
    assert details == {"bytes": 400, "total": 1000, "rate": 100, "eta": 6.0}
    unknown = ProgressMeter(None, 0, 0.0)
    assert unknown.update(10, 0.1) is None
    assert unknown.update(50, 1.0) == {"bytes": 50, "total": None, "rate": 50, "eta": None}


def test_progress_rate_forgets_old_samples() -> None:
    meter = ProgressMeter(10**9, 0, 0.0, interval=1.0, step=1.0, window=5.0)
    done = 0
    for second in range(1, 11):  # 1000 bytes/s for 10 s ...
        done += 1000
        meter.update(done, float(second))
    for second in range(11, 21):  # ... then 100 bytes/s
        done += 100
        details = meter.update(done, float(second))
    assert details is not None and details["rate"] == 100


def test_sizes_read_in_binary_units() -> None:
    assert human_size(None) == "size unknown"
    assert human_size(512) == "512 B"
    assert human_size(1536) == "1.5 KiB"
    assert human_size(5 * 1024**3) == "5.0 GiB"
    assert human_size(3 * 1024**4) == "3072.0 GiB"  # GiB is the largest unit


def test_durations_read_in_the_largest_sensible_units() -> None:
    assert human_duration(None) == "?"
    assert human_duration(4.25) == "4.2 s"
    assert human_duration(42.7) == "42 s"
    assert human_duration(185) == "3 min 05 s"
    assert human_duration(3720) == "1 h 02 min"
