"""qatbench: a benchmark suite for quantization-aware training (QAT) methods."""

__version__ = "0.1.0"
