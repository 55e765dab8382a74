"""probes: config-driven, resumable linear-probe sweeps on top of `interp.probing`.

`probes sweep CONFIG.yaml` (or `probes.sweep(config)`) probes every cell of models x hooks x
positions x targets, fitting all layers of a hook at once; activations come from `interp`'s
activation stores (built if missing); finished cells are written atomically and skipped on a
rerun, and stores and cells are named by a content hash of their resolved specs (`probes.identity`),
so a changed data seed, probe setting or model is recomputed, never mixed with old outputs; cells run in this process, in local worker processes (`--workers N`) or on Ray
(optional extra). `interp` never imports this package. Probing methodology: Hewitt & Liang
2019 (control tasks, selectivity); see `interp.probing`.
"""

from probes.backends import LocalBackend, ProcessBackend, RayBackend, get_backend
from probes.config import DataSpec, ProbeSpec, SweepConfig, TargetSpec, load_config
from probes.sweep import Cell, SweepResult, plan, run_cell, sweep

__all__ = [
    "Cell",
    "DataSpec",
    "LocalBackend",
    "ProbeSpec",
    "ProcessBackend",
    "RayBackend",
    "SweepConfig",
    "SweepResult",
    "TargetSpec",
    "get_backend",
    "load_config",
    "plan",
    "run_cell",
    "sweep",
]
