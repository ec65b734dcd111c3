"""Data sources -> token sequences for the teacher (stage one)."""

from qadpipe.data.loader import DataSlice, check_data_config, load_sequences
from qadpipe.data.sequences import TokenSequence

__all__ = ["DataSlice", "TokenSequence", "check_data_config", "load_sequences"]
