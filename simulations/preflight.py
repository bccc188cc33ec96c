"""The checks `coautogen run` makes in its own process before any Flower process starts.

:func:`preflight` loads the data, splits it across the simulated sites, builds the embedder and
checks that every model the run names is there, so that a wrong data folder, missing weights or
a missing GPU fail in a second with one line (:class:`PreflightError`) instead of as a failed
Flower run; what needs the operator's eye but does not stop the run is printed as warnings.
"""

from __future__ import annotations

import sys
from typing import IO

from coautogen_fl.config import RunConfig


class PreflightError(RuntimeError):
    """The run would fail inside Flower; caught before anything starts."""


def preflight(cfg: RunConfig, out: IO[str] | None = None) -> None:
    """Load the data, split it across the sites, build the embedder and check that every model
    the run names is there (without loading generator weights), in this process.

    A wrong data folder, a site left without data, missing weights or a missing GPU would otherwise
    surface only as a failed Flower run after the SuperLink started; here they cost a second.
    What needs the operator's eye but does not stop the run (unreadable image files skipped, a
    class with fewer than 2 images in the folder or at a simulated site, images outside any class
    folder) is printed to ``out`` (default: stderr), all of it in one pass.
    """
    import numpy as np

    from coautogen_fl.data import DataError, load_pool_and_test, partition_indices, site_partition
    from coautogen_fl.device import DeviceError, resolve_device
    from coautogen_fl.downstream import pretrained_weights
    from coautogen_fl.embedding import build_embedder
    from coautogen_fl.generation.pipeline import check_model_sources
    from coautogen_fl.hub import ModelLoadError

    out = out or sys.stderr
    sites = cfg.federation.num_hospitals
    small_sites: list[str] = []
    try:
        pool, _ = load_pool_and_test(cfg.data)
        for partition_id in range(sites):
            # Any key will do: only whether each site holds data is checked here.
            site_partition(pool, partition_id, sites, cfg.data, key=b"preflight")
            counts = np.bincount(
                pool.labels[partition_indices(pool.labels, sites, cfg.data, partition_id)],
                minlength=len(pool.class_names),
            )
            small = [f"{pool.class_names[c]!r} {int(n)}" for c, n in enumerate(counts) if n < 2]
            if small:
                small_sites.append(f"site {partition_id}: {', '.join(small)}")
        build_embedder(cfg.embedder)
        check_model_sources(cfg, resolve_device(cfg.device, cfg.device_id))
        pretrained_weights(cfg.downstream.pretrained, cfg.downstream.model, cfg.downstream.weights)
    except (DataError, ModelLoadError, DeviceError) as exc:
        raise PreflightError(str(exc)) from None
    report = pool.report
    if report is not None and report.lines():
        total = sum(report.class_counts.values())
        out.write(
            f"coautogen: {'warning' if report.problems() else 'note'}: data check of data.name={report.root}: "
            f"{total} readable images in {len(report.class_counts)} classes\n"
        )
        out.writelines(f"  {line}\n" for line in report.lines())
    if small_sites:
        out.write(
            f"coautogen: warning: {len(small_sites)} of {sites} simulated sites hold fewer than 2 images of a class "
            f"(data.partitioner={cfg.data.partitioner}; class and images per site):\n"
        )
        out.writelines(f"  {line}\n" for line in small_sites)
