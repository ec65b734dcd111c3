"""qadpipe: offline teacher-logit caching for Quantization-Aware Distillation."""

__version__ = "0.1.0"
