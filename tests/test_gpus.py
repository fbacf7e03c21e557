"""``renderfarm worker --gpus``: one worker per GPU, each with its own CUDA_VISIBLE_DEVICES."""

from __future__ import annotations

import shutil

import pytest

from worker.gpus import gpu_ids, worker_commands


def test_explicit_gpu_list():
    assert gpu_ids("0,2") == ["0", "2"]
    with pytest.raises(ValueError, match="--gpus must be 'all' or GPU indices"):
        gpu_ids("first")


def test_each_worker_sees_only_its_gpu():
    commands = worker_commands(["0", "1"], ["--profile", "gpu"])
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in commands] == ["0", "1"]
    for cmd, _ in commands:
        assert cmd[1:4] == ["-m", "renderfarm", "worker"] and "--profile" in cmd
    assert commands[0][0][-1] != commands[1][0][-1]  # distinct worker names


def test_each_worker_has_its_own_metrics_port(monkeypatch):
    monkeypatch.setenv("RENDERFARM_METRICS_PORT", "9464")
    commands = worker_commands(["0", "1", "3"], ["--profile", "gpu"])
    assert [env["RENDERFARM_METRICS_PORT"] for _, env in commands] == ["9464", "9465", "9466"]


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has GPUs")
def test_all_without_gpus_is_a_clear_error():
    with pytest.raises(RuntimeError, match="nvidia-smi"):
        gpu_ids("all")
