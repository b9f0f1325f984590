"""pin_threads pins every thread of the process (existing runtime thread pools too) and restores each."""

import os
import threading

import pytest

from repvit.bench.machine import pin_threads


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or not os.path.isdir("/proc/self/task"),
                    reason="needs Linux thread affinity")
def test_pin_threads_applies_to_other_threads_and_restores_them():
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("this process may use only 1 CPU: pinning to 1 changes nothing")
    started, stop = threading.Event(), threading.Event()

    def helper():
        started.set()
        stop.wait(30)

    t = threading.Thread(target=helper, daemon=True)
    t.start()
    try:
        started.wait(10)
        tid = t.native_id
        before = os.sched_getaffinity(tid)
        with pin_threads(1) as p:
            assert os.sched_getaffinity(tid) == set(p["cpus"]) != before
            late = threading.Thread(target=stop.wait, args=(30,), daemon=True)  # started while pinned
            late.start()
        assert os.sched_getaffinity(tid) == before
        assert os.sched_getaffinity(late.native_id) == os.sched_getaffinity(0) == before
    finally:
        stop.set()
        t.join(10)
