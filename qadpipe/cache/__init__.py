"""The logit cache: versioned zstd Parquet shards of teacher targets, committed through
per-task manifests (see :mod:`qadpipe.cache.schema` for the layout)."""

from qadpipe.cache.reader import CacheReader
from qadpipe.cache.schema import FORMAT_VERSION, CacheMeta
from qadpipe.cache.writer import CacheWriter

__all__ = ["CacheMeta", "CacheReader", "CacheWriter", "FORMAT_VERSION"]
