"""textpoke: live kernel text patching on an emulated SMP x86_64 machine."""

from .image import BP_ENTRIES, NMI_ENTRIES, KernelConfig, KernelImage, Percpu, build_kernel

__all__ = ["BP_ENTRIES", "NMI_ENTRIES", "KernelConfig", "KernelImage", "Percpu", "build_kernel"]
__version__ = "0.1.0"
