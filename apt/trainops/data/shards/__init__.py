"""Prepared token shards: ``python -m apt data prepare`` writes them, ``data.source: {kind:
shards}`` reads them. The format is in :mod:`apt.trainops.data.shards.index`."""

from apt.trainops.data.shards.index import INDEX_FILE, SHARD_FORMAT, ShardIndex, read_index

__all__ = ["INDEX_FILE", "SHARD_FORMAT", "ShardIndex", "read_index"]
