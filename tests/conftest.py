"""Shared fixtures (the kernel image and a machine factory) and `run_cli`, which test modules import."""

from __future__ import annotations

import pytest

from cpus import Machine, MachineConfig
from textpoke.cli import main
from textpoke.image import KernelImage, build_kernel


@pytest.fixture(scope="session")
def kernel() -> KernelImage:
    return build_kernel()


@pytest.fixture
def make_machine(kernel):
    def make(bp_mode: str = "emulate", nmi_entry: str = "naive", instruments=(), **config) -> Machine:
        return Machine(MachineConfig(**config), kernel.boot_image(bp_mode, nmi_entry), instruments)

    return make


def run_cli(capsys, *argv: str) -> tuple[int, str, list[str]]:
    """main(argv) in this process: (exit status, stdout, stderr lines)."""
    try:
        rc = main(list(argv))
    except SystemExit as stop:  # argparse
        rc = stop.code
    got = capsys.readouterr()
    return rc, got.out, got.err.strip().splitlines()
