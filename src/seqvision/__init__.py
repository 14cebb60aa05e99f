"""seqvision: RNN or Transformer? A reproducible comparison on vision sequence tasks."""

__version__ = "0.1.0"
