"""``orbax.checkpoint.checkpoint_managers.preservation_policy``: which steps a manager keeps."""

from __future__ import annotations

from flaxckpt._policies import (AnyPreservationPolicy, BestN, CustomSteps, EveryNSeconds,
                                EveryNSteps, EveryNStepsClosest, LatestDuration, LatestN,
                                PolicyCheckpointInfo, PreservationContext, PreservationPolicy,
                                PreserveAll)

__all__ = [
    'AnyPreservationPolicy', 'BestN', 'CustomSteps', 'EveryNSeconds', 'EveryNSteps',
    'EveryNStepsClosest', 'LatestDuration', 'LatestN', 'PolicyCheckpointInfo',
    'PreservationContext', 'PreservationPolicy', 'PreserveAll',
]
