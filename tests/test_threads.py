"""glmchat.kernels.threads: the governor that runs a CPU model on the cores other programs leave free."""

import os
import subprocess
import sys
import time

import pytest
import torch

from glmchat.kernels import install, threads
from glmchat.loader import load_model

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="the governor reads Linux's /proc/stat")

STAT = """cpu  900 9 90 9000 90 9 9 9 0 0
cpu0 100 1 10 1000 10 1 1 2 50 0
cpu1 300 3 30 3000 30 3 3 4 0 0
intr 12345 0 0
"""


def test_busy_time_is_user_nice_system_irq_softirq_steal_of_the_cpus_asked():
    tick = os.sysconf("SC_CLK_TCK")
    assert threads.cpu_busy_seconds({0}, STAT) == pytest.approx((100 + 1 + 10 + 1 + 1 + 2) / tick)
    assert threads.cpu_busy_seconds({1}, STAT) == pytest.approx((300 + 3 + 30 + 3 + 3 + 4) / tick)
    assert threads.cpu_busy_seconds({0, 1}, STAT) == pytest.approx((115 + 343) / tick)


@pytest.mark.parametrize("max_threads, cpus, others, expected", [
    (2, 2, 0.0, 2), (2, 2, 0.4, 2), (2, 2, 1.0, 1), (2, 2, 1.9, 1), (2, 2, 2.0, 1),
    (4, 16, 0.0, 4), (8, 16, 10.2, 6), (1, 2, 0.0, 1),
])
def test_threads_are_the_cores_left_within_one_and_the_most(max_threads, cpus, others, expected):
    assert threads.threads_for(max_threads, cpus, others) == expected
    assert threads.threads_for(max_threads, cpus, others, running=min(max_threads, cpus) - 1 or 1) == expected


@pytest.mark.parametrize("cpus, others, expected", [(2, 0.0, 2), (2, 0.1, 2), (2, 0.25, 1), (2, 0.6, 1),
                                                     (16, 0.3, 15), (16, 2.6, 13)])
def test_with_a_thread_on_every_cpu_a_share_of_one_gives_it_up(cpus, others, expected):
    """Next to a thread of ours on every CPU, a program that wants a core shows only as a share of
    one (0.20-0.35 of a core measured on 2): any share from CONTENDED on gives a core up."""
    assert threads.threads_for(cpus, cpus, others, running=cpus) == expected


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def spin_on(cpu: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"])


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_a_busy_core_is_seen_and_given_up_then_taken_back(restore_threads):
    cpus = os.sched_getaffinity(0)
    torch.set_num_threads(len(cpus))
    governor = threads.ThreadGovernor(interval=0.0)
    governor()  # first look
    spin = spin_on(min(cpus))
    try:
        time.sleep(1.5)
        governor()
    finally:
        spin.kill()
        spin.wait()
    assert 0.6 < governor.others < 1.5
    assert torch.get_num_threads() == len(cpus) - 1
    time.sleep(1.5)
    governor()
    assert governor.others < 0.5
    assert torch.get_num_threads() == len(cpus)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_a_core_taken_while_we_compute_is_given_up(restore_threads):
    """The busy loop starts while this process keeps every CPU busy (a decode in progress): the
    governor sees only the loop's share of a core, and gives the core up."""
    cpus = os.sched_getaffinity(0)
    torch.set_num_threads(len(cpus))
    governor = threads.ThreadGovernor(interval=0.0)
    governor()
    spin = spin_on(min(cpus))
    try:
        a, start = torch.randn(600, 600), time.monotonic()
        while time.monotonic() - start < 1.5:
            a = torch.tanh(a @ a)  # every thread busy
        governor()
    finally:
        spin.kill()
        spin.wait()
    assert governor.others >= threads.CONTENDED
    assert torch.get_num_threads() == len(cpus) - 1


def test_a_count_chosen_by_the_caller_is_the_new_most(restore_threads):
    torch.set_num_threads(1)
    governor = threads.ThreadGovernor(interval=0.0)
    governor()
    time.sleep(0.2)
    governor()
    assert governor.max_threads == 1 and torch.get_num_threads() == 1


def test_install_attaches_one_governor_and_the_portable_path_none(tiny_ckpt):
    model, _ = load_model(tiny_ckpt, dtype=torch.float32, progress=False)
    install(model)
    install(model)
    governors = [h for h in model._forward_pre_hooks.values() if isinstance(h, threads.ThreadGovernor)]
    assert len(governors) == 1
    install(model, enabled=False)
    assert not any(isinstance(h, threads.ThreadGovernor) for h in model._forward_pre_hooks.values())


def test_the_governor_looks_before_decode_steps_too(tiny_ckpt, restore_threads):
    """Decode steps go through the module's call: a program that starts in the middle of a long
    answer is seen within the answer, not at the next prompt."""
    model, _ = load_model(tiny_ckpt, dtype=torch.float32, progress=False)
    governor = next(h for h in model._forward_pre_hooks.values() if isinstance(h, threads.ThreadGovernor))
    governor.interval = 0.0
    cache = model.new_cache(1, 8)
    with torch.inference_mode():
        model(torch.tensor([[5, 6, 7]]), cache=cache)
        looked = governor._last
        model.decode(torch.tensor([[8]]), cache)
    assert governor._last is not None and governor._last is not looked
