"""``orbax.checkpoint.checkpoint_managers``: save-decision and preservation policies.

Example (how gemma and kauldron configure a manager)::

  options = ocp.CheckpointManagerOptions(
      save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(1000),
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy([
          ocp.checkpoint_managers.LatestN(3),
          ocp.checkpoint_managers.EveryNSteps(interval_steps=10_000)]))
"""

from __future__ import annotations

from flaxckpt._manager import CheckpointManager, CheckpointManagerOptions
from flaxckpt._policies import PolicyCheckpointInfo
from flaxckpt.checkpoint_managers import preservation_policy, save_decision_policy
from flaxckpt.checkpoint_managers.preservation_policy import (AnyPreservationPolicy, BestN,
                                                              CustomSteps, EveryNSeconds,
                                                              EveryNSteps, EveryNStepsClosest,
                                                              LatestDuration, LatestN,
                                                              PreservationContext,
                                                              PreservationPolicy, PreserveAll)
from flaxckpt.checkpoint_managers.save_decision_policy import (AnySavePolicy,
                                                               ContinuousCheckpointingPolicy,
                                                               DecisionContext,
                                                               FixedIntervalPolicy,
                                                               InitialSavePolicy,
                                                               PreemptionCheckpointingPolicy,
                                                               SaveDecisionPolicy,
                                                               SpecificStepsPolicy)

__all__ = [
    'AnyPreservationPolicy', 'AnySavePolicy', 'BestN', 'CheckpointManager',
    'CheckpointManagerOptions', 'ContinuousCheckpointingPolicy', 'CustomSteps',
    'DecisionContext', 'EveryNSeconds', 'EveryNSteps', 'EveryNStepsClosest',
    'FixedIntervalPolicy', 'InitialSavePolicy', 'LatestDuration', 'LatestN',
    'PolicyCheckpointInfo', 'PreemptionCheckpointingPolicy', 'PreservationContext',
    'PreservationPolicy', 'PreserveAll', 'SaveDecisionPolicy', 'SpecificStepsPolicy',
    'preservation_policy', 'save_decision_policy',
]
