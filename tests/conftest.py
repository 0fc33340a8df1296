"""Shared fixtures: the kernel image and a machine factory."""

from __future__ import annotations

import pytest

from cpus import Machine, MachineConfig
from textpoke.image import KernelImage, build_kernel


@pytest.fixture(scope="session")
def kernel() -> KernelImage:
    return build_kernel()


@pytest.fixture
def make_machine(kernel):
    def make(bp_mode: str = "emulate", nmi_entry: str = "naive", instruments=(), **config) -> Machine:
        return Machine(MachineConfig(**config), kernel.boot_image(bp_mode, nmi_entry), instruments)

    return make
