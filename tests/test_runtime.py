"""The environment a stage runs in: the job's threads for torch, huge pages for large buffers."""

from __future__ import annotations

import os

import torch

from qlora_pipeline.jobs.environment import job_environment


def test_job_environment_sets_threads_and_huge_pages_then_restores(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    before = torch.get_num_threads()
    with job_environment(1):
        assert torch.get_num_threads() == 1
        assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == "1"
        assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
    assert torch.get_num_threads() == before
    assert os.environ["OMP_NUM_THREADS"] == "7"
    assert "THP_MEM_ALLOC_ENABLE" not in os.environ and "MKL_NUM_THREADS" not in os.environ


def test_a_users_huge_page_setting_wins(monkeypatch):
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    with job_environment(2):
        assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"
