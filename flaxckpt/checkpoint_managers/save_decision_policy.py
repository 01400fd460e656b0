"""``orbax.checkpoint.checkpoint_managers.save_decision_policy``: which steps a manager saves."""

from __future__ import annotations

from flaxckpt._policies import (AnySavePolicy, ContinuousCheckpointingPolicy, DecisionContext,
                                FixedIntervalPolicy, InitialSavePolicy, PolicyCheckpointInfo,
                                PreemptionCheckpointingPolicy, SaveDecisionPolicy,
                                SpecificStepsPolicy)

__all__ = [
    'AnySavePolicy', 'ContinuousCheckpointingPolicy', 'DecisionContext', 'FixedIntervalPolicy',
    'InitialSavePolicy', 'PolicyCheckpointInfo', 'PreemptionCheckpointingPolicy',
    'SaveDecisionPolicy', 'SpecificStepsPolicy',
]
