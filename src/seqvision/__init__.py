"""seqvision: RNN or Transformer? A reproducible comparison on vision sequence tasks."""

from seqvision.kernels import pin_cpu_kernels

# Before anything imports torch: the same CPU kernels on every x86-64 machine (seqvision/kernels.py).
pin_cpu_kernels()

__version__ = "0.1.0"
