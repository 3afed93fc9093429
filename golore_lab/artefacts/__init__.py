"""The paper's artefacts, one module each, all with the same protocol.

Every module ``golore_lab.artefacts.NAME`` has:

* ``NAME`` -- the artefact's name (its figure is ``figures/NAME.png``, its table ``figures/NAME.md``);
* ``Config`` -- a frozen dataclass, everything the result depends on; its ``preset`` field is one of
  :data:`PRESET_NAMES`;
* ``PRESETS = {"fast": Config(...), "default": ..., "full": ...}``;
* ``run(config) -> pandas.DataFrame`` -- compute the result (tidy, one row per logged value);
* ``plot(frame) -> matplotlib Figure`` and, for tables, ``table(frame) -> str`` (Markdown);
* ``GROUP_BY`` and ``expected_groups(config)`` -- the groups (runs, seeds, panels) a complete result has,
  which the cache checks (:mod:`golore_lab.artefacts.cache`).

:func:`result` returns an artefact's frame from its validated cache, or runs and caches it. ``python -m
golore_lab figures`` (:mod:`golore_lab.figures`) loops over :data:`ARTEFACTS`; the notebooks call the same
``result``/``plot``.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

from .cache import CacheError, load, store

#: every artefact, in the order ``python -m golore_lab figures`` makes them
ARTEFACTS = (
    "fig1_counterexample", "fig1_counterexample_noB",
    "fig2_captured", "fig2_isotropic", "fig2_snr_sweep", "fig2_llama_captured",
    "fig3_pretrain", "table2_finetune", "fig4_finetune",
    "fig5_stiefel_mean", "fig5_perturbation_bound", "fig5_rates_stochastic", "fig5_rate_deterministic",
    "fig6_when_to_switch", "fig7_batch_size",
)
PRESET_NAMES = ("fast", "default", "full")
#: the repository's figures folder (its ``data/runs`` holds the committed caches)
FIGURES = Path(__file__).resolve().parents[2] / "figures"


def get(name: str) -> ModuleType:
    """The module of artefact ``name``."""
    if name not in ARTEFACTS:
        raise ValueError(f"Unknown artefact: {name!r} (choose from {', '.join(ARTEFACTS)})")
    return importlib.import_module(f"{__name__}.{name}")


def env_preset() -> str:
    """``$GOLORE_LAB_PRESET`` (``default`` when unset), checked."""
    preset = os.environ.get("GOLORE_LAB_PRESET", "default")
    if preset not in PRESET_NAMES:
        raise ValueError(f"Invalid GOLORE_LAB_PRESET: {preset!r} (choose from {', '.join(PRESET_NAMES)})")
    return preset


def cache_root(figures: Path | str | None = None) -> Path:
    """``FIGURES/data/runs``, with FIGURES ``figures``, else ``$GOLORE_LAB_FIGURES``, else the repository's."""
    return Path(figures or os.environ.get("GOLORE_LAB_FIGURES") or FIGURES) / "data" / "runs"


def config_of(artefact: ModuleType, preset: str):
    if preset not in artefact.PRESETS:
        raise ValueError(f"Invalid preset: {preset!r} (choose from {', '.join(artefact.PRESETS)})")
    return artefact.PRESETS[preset]


def load_cached(artefact: ModuleType | str, config, root: Path | None = None):
    """The validated cached frame of ``artefact`` for ``config``; :class:`CacheError` if absent or damaged."""
    artefact = get(artefact) if isinstance(artefact, str) else artefact
    return load(root or cache_root(), artefact.NAME, config, artefact.GROUP_BY, artefact.expected_groups(config))


def compute(artefact: ModuleType | str, config, root: Path | None = None):
    """Run ``artefact`` with ``config``, cache the result, and return it as read back from the cache (so that
    a fresh result and a cached one are plotted from the same rounded numbers)."""
    artefact = get(artefact) if isinstance(artefact, str) else artefact
    root = root or cache_root()
    store(root, artefact.NAME, config, artefact.run(config), artefact.GROUP_BY, artefact.expected_groups(config))
    return load_cached(artefact, config, root)


def result(artefact: ModuleType | str, preset: str | None = None, root: Path | None = None,
           recompute: bool = True, log=print):
    """The frame of ``artefact`` at ``preset`` (default ``$GOLORE_LAB_PRESET``): from its cache if that
    validates; else, when ``recompute``, run it (saying why), else raise :class:`CacheError`."""
    artefact = get(artefact) if isinstance(artefact, str) else artefact
    config = config_of(artefact, preset or env_preset())
    try:
        return load_cached(artefact, config, root)
    except CacheError as error:
        if not recompute:
            raise
        log(f"{artefact.NAME}: {error.path.name}: {error.reason}; recomputing")
    return compute(artefact, config, root)


__all__ = ["ARTEFACTS", "PRESET_NAMES", "CacheError", "cache_root", "compute", "env_preset", "get",
           "load_cached", "result"]
