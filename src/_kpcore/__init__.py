"""KernelPort's compiled core: shared-memory segments, doorbells and lanes of batch slots."""

from _kpcore.core import (
    CONTROL,
    DOORBELL_BYTES,
    LANE_DEAD,
    LANE_LIVE,
    LANE_RETIRED,
    MAX_TENSORS,
    NONE,
    Doorbell,
    FencedMapping,
    Lane,
    LaneAbandoned,
    LaneDead,
    LaneError,
    LaneExpired,
    LaneFull,
    LaneRetired,
    LaneTimeout,
    Scheduler,
    Segment,
    SourceFault,
    StatsBlock,
    guarded_copy,
    next_batch,
    now_ns,
)

__all__ = [
    "CONTROL", "DOORBELL_BYTES", "LANE_DEAD", "LANE_LIVE", "LANE_RETIRED", "MAX_TENSORS", "NONE", "FencedMapping",
    "Doorbell", "Lane", "LaneAbandoned", "LaneDead", "LaneError", "LaneExpired", "LaneFull", "LaneRetired",
    "LaneTimeout",
    "Scheduler", "Segment", "SourceFault", "StatsBlock", "guarded_copy", "next_batch", "now_ns",
]
