"""Waiting on a starting server's progress: a fake clock, process and log (no server)."""
import pytest

from cp_engine.devtools.start_watch import StartFailed, StartLimits, wait_for_start


class FakeStart:
    """A scripted server start: ``log_at[t]`` is the log text from second t on,
    ``ready_at``/``exit_at`` the second it becomes healthy / exits."""

    def __init__(self, log_at: dict, ready_at=None, exit_at=None):
        self.t = 0.0
        self.log_at, self.ready_at, self.exit_at = log_at, ready_at, exit_at
        self.reports: list[str] = []

    def clock(self):
        return self.t

    def sleep(self, s):
        self.t += s

    def ready(self):
        return self.ready_at is not None and self.t >= self.ready_at

    def exit_code(self):
        return 1 if self.exit_at is not None and self.t >= self.exit_at else None

    def log(self):
        text = ""
        for t in sorted(self.log_at):
            if t <= self.t:
                text = self.log_at[t]
        return text

    def run(self, limits):
        return wait_for_start(self.ready, self.exit_code, self.log, limits, self.reports.append,
                              clock=self.clock, sleep=self.sleep)


LIMITS = StartLimits(stall_s=100, cap_s=1000, heartbeat_s=30, poll_s=1)


def growing_log(until: int, every: int) -> dict:
    """A log that gains a line every ``every`` seconds up to ``until``."""
    return {t: "".join(f"line {i}\n" for i in range(0, t + 1, every)) for t in range(0, until + 1, every)}


def test_a_slow_start_that_keeps_logging_is_waited_for_past_the_stall_window():
    fake = FakeStart(growing_log(until=600, every=60), ready_at=650)
    assert fake.run(LIMITS) == 650  # far beyond stall_s: the log kept advancing


def test_a_silent_log_fails_after_the_stall_window_with_the_reason():
    fake = FakeStart({0: "loading\n", 50: "loading\nmore\n"}, ready_at=900)
    with pytest.raises(StartFailed, match="silent for 101 s") as e:
        fake.run(LIMITS)
    assert e.value.reason == "stalled" and fake.t == 151


def test_the_hard_cap_ends_a_start_whose_log_never_stops():
    fake = FakeStart(growing_log(until=2000, every=10), ready_at=None)
    with pytest.raises(StartFailed, match="not ready after 1001 s") as e:
        fake.run(LIMITS)
    assert e.value.reason == "cap"


def test_an_exited_process_fails_at_once():
    fake = FakeStart(growing_log(until=100, every=5), ready_at=500, exit_at=12)
    with pytest.raises(StartFailed, match="exited with code 1 after 12 s") as e:
        fake.run(LIMITS)
    assert e.value.reason == "exited"


def test_phases_are_reported_once_and_heartbeats_carry_the_last_line():
    log = {0: "INFO non-default args: {}\n",
           20: "INFO non-default args: {}\nINFO Loading weights took 0.1 s\n",
           40: "INFO non-default args: {}\nINFO Loading weights took 0.1 s\nINFO waiting on something\n"}
    fake = FakeStart(log, ready_at=70)
    fake.run(LIMITS)
    phases = [r.split(" s  ", 1)[1] for r in fake.reports if "still starting" not in r]
    assert phases == ["parsing arguments", "weights loaded"]
    beats = [r for r in fake.reports if "still starting" in r]
    assert len(beats) == 2 and beats[-1].endswith("last log line: INFO waiting on something")


def test_limits_come_from_the_environment_and_an_explicit_cap_wins(monkeypatch):
    monkeypatch.delenv("CP_VLLM_START_CAP_S", raising=False)
    monkeypatch.setenv("CP_TEST_START_TIMEOUT_S", "900")
    monkeypatch.setenv("CP_VLLM_START_STALL_S", "45")
    assert StartLimits.from_env() == StartLimits(stall_s=45, cap_s=900)
    monkeypatch.setenv("CP_VLLM_START_CAP_S", "1200")
    assert StartLimits.from_env().cap_s == 1200
    assert StartLimits.from_env(cap_s=60).cap_s == 60
