"""Flower's records <-> the plain :class:`coautogen_fl.protocol.WireParts` of the typed wire
records. The strategy and the ClientApp both translate through here and nowhere else."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from coautogen_fl.protocol import WireParts


def to_content(parts: WireParts) -> RecordDict:
    """The RecordDict of a typed record's parts."""
    records: dict = {
        name: ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
        for name, arrays in parts.arrays.items()
    }
    records.update({name: ConfigRecord(dict(values)) for name, values in parts.configs.items()})
    records.update({name: MetricRecord(dict(values)) for name, values in parts.metrics.items()})
    return RecordDict(records)


def from_content(content: RecordDict) -> WireParts:
    """The parts of a received RecordDict (arrays as numpy)."""
    return WireParts(
        arrays={
            name: {k: np.asarray(a.numpy()) for k, a in record.items()}
            for name, record in content.array_records.items()
        },
        configs={name: dict(record) for name, record in content.config_records.items()},
        metrics={name: dict(record) for name, record in content.metric_records.items()},
    )
