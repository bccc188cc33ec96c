"""One GPU, many sites: the device each piece selects, checked without a GPU (torch's CUDA
queries are stubbed). The CPU path is the same code with device "cpu"."""

from __future__ import annotations

import pytest
import torch

from clients import site as site_module
from coautogen_fl.config import load_config
from simulations.cli import gpu_share


@pytest.fixture
def one_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_cuda_derives_a_gpu_fraction_shared_by_every_actor(one_gpu):
    assert gpu_share(load_config(overrides=["device=cuda"]), cpus=2) == 0.5  # two actors, one GPU
    assert gpu_share(load_config(overrides=["device=auto", "federation.client_num_cpus=2"]), cpus=8) == 0.25
    assert gpu_share(load_config(overrides=["device=cuda", "federation.client_num_gpus=0.1"]), cpus=2) == 0.1  # as set


def test_the_cpu_path_asks_for_no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_share(load_config(overrides=["device=cpu"]), cpus=2) == 0.0
    assert gpu_share(load_config(overrides=["device=auto"]), cpus=2) == 0.0
    with pytest.raises(Exception, match="no CUDA GPU is visible"):
        gpu_share(load_config(overrides=["device=cuda"]), cpus=2)


def test_every_site_of_a_process_shares_one_embedder_per_device(one_gpu, monkeypatch):
    built = []

    def build(cfg, device):
        built.append(device)
        return object()

    monkeypatch.setattr(site_module, "build_embedder", build)
    monkeypatch.setattr(site_module, "_EMBEDDERS", {})
    gpu = load_config(overrides=["device=cuda"])
    first = site_module.shared_embedder(gpu)
    assert all(site_module.shared_embedder(gpu) is first for _ in range(100))  # 100 more sites: no new copy
    assert built == ["cuda:0"]
    cpu = site_module.shared_embedder(load_config(overrides=["device=cpu"]))
    assert cpu is not first and built == ["cuda:0", "cpu"]
