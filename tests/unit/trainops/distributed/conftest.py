"""A real one-process gloo group, for unit tests of what needs a process group (DDP, FSDP2)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch.distributed as dist


@pytest.fixture
def gloo_world1() -> Iterator[None]:
    """init_process_group(gloo) with world_size 1 on an in-memory store; destroyed after."""
    assert not dist.is_initialized(), "a previous test leaked its process group"
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture
def no_launcher_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No torchrun variable is set (tests add the ones they need)."""
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch
