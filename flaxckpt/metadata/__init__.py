"""Checkpoint metadata, as ``orbax.checkpoint.metadata``: step metadata (``StepMetadata``,
``get_step_metadata``), the value metadata ``metadata()`` returns for each saved leaf
(``ArrayMetadata``, ``ScalarMetadata``, ``StringMetadata``), saved shardings, and the tree-level
classes in ``metadata.tree``."""

from __future__ import annotations

from flaxckpt.metadata import tree, value
from flaxckpt.metadata._sharding import (NamedShardingMetadata, ShardingMetadata,
                                         SingleDeviceShardingMetadata)
from flaxckpt.metadata._step import (RootMetadata, StepMetadata, get_step_metadata,
                                     read_step_metadata)
from flaxckpt.metadata.tree import TreeMetadata, ValueMetadataEntry
from flaxckpt.metadata.value import (ArrayMetadata, Metadata, ScalarMetadata, StorageMetadata,
                                     StringMetadata)

__all__ = [
    'ArrayMetadata', 'Metadata', 'NamedShardingMetadata', 'RootMetadata', 'ScalarMetadata',
    'ShardingMetadata', 'SingleDeviceShardingMetadata', 'StepMetadata', 'StorageMetadata',
    'StringMetadata', 'TreeMetadata', 'ValueMetadataEntry', 'get_step_metadata',
    'read_step_metadata', 'tree', 'value',
]
