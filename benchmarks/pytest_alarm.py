"""A per-test timeout for pytest without pytest-timeout (gpu_check.sh uses it when that plugin is
not installed on the device machine).

    PYTHONPATH=benchmarks python -m pytest -p pytest_alarm --alarm-timeout=60 tests/test_x.py

Each test (setup, call and teardown together) gets SIGALRM after N seconds; the handler raises
``AlarmTimeout`` in the test, which fails with that message and the run goes on to the next test.
Python handles the signal between bytecodes, so a test stuck inside one long C call (a hung kernel
sync) is only stopped when that call returns: gpu_check.sh also runs pytest under `timeout`.
Unix main thread only; 0 disables it.
"""

from __future__ import annotations

import signal

import pytest


class AlarmTimeout(Exception):
    """Raised in a test that ran past --alarm-timeout seconds."""


def pytest_addoption(parser):
    parser.addoption("--alarm-timeout", type=int, default=0,
                     help="seconds per test (setup + call + teardown) before it fails with AlarmTimeout; 0: off")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    seconds = item.config.getoption("--alarm-timeout")
    if seconds <= 0:
        yield
        return

    def on_alarm(signum, frame):
        raise AlarmTimeout(f"{item.nodeid} ran longer than --alarm-timeout={seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
