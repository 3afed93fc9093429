"""One specification of a subspace method: its settings and the rules' hyper-parameters (what gets a rank, the
model's param groups, is :mod:`golore_lab.groups`, re-exported here).

Every API of the package that takes these values checks them here, with the same messages:
:class:`golore_lab.optim.SubspaceAdamW` / :class:`~golore_lab.optim.SubspaceSGD` (constructor,
``add_param_group``, ``load_state_dict``) and :class:`golore_lab.wrapper.SubspaceModel`.

Subspace settings (:data:`SUBSPACE_DEFAULTS`, one value per param group or per wrapped model):

=====================  ==============================================================================
``rank``               r, an integer >= 1 (``None``: a full-space group)
``update_proj_gap``    refresh the basis at steps t with t % gap == 0; an integer >= 1
``scale``              α in W ← W − lr·α·P N; a finite number > 0
``proj_type``          which side is projected: ``"std"``, ``"reverse_std"``, ``"left"``, ``"right"``
``projection``         ``"svd"`` (GaLore), ``"random"`` (GoLore) or a projector callable
``switch_step``        GoLore@x%: refreshes at t >= switch_step are random; ``None``, an integer >= 0, or
                       ``"auto"`` (GoLore@auto: each parameter switches when its SVD subspace is noise-dominated)
``switch_fraction``    the same switch given as x/100 with ``total_steps`` T: switch_step =
``total_steps``        round((1 − x/100)·T), exactly :meth:`golore_lab.methods.Method.switch_step`
``state_on_refresh``   ``"project"``, ``"keep"`` or ``"reset"`` (see :func:`golore_lab.rules.refresh_state`)
``seed``               an integer; random bases are a pure function of (seed, parameter position, step)
``foreach``            the batched path (:mod:`golore_lab.batched`): ``None`` (on CUDA), ``True`` or ``False``
=====================  ==============================================================================

Numbers may be Python or numpy scalars (``np.int64``, ``np.float32``); they are stored as Python ``int`` /
``float`` so that a state dict stays loadable with ``torch.load(..., weights_only=True)``. ``bool`` is not an
integer here (``update_proj_gap=True`` is refused). A learning rate may also be a floating tensor of one element
(any shape), which LR schedulers and ``torch.compile`` use; it is kept as given.
"""
from __future__ import annotations

import difflib
import math
import numbers
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from torch import Tensor

from . import projection as proj
from . import rules
from . import switching
from .methods import Method

SUBSPACE_DEFAULTS: dict[str, Any] = {
    "rank": None,
    "update_proj_gap": 200,
    "scale": 1.0,
    "proj_type": "std",
    "projection": "svd",
    "switch_step": None,
    "switch_fraction": None,
    "total_steps": None,
    "state_on_refresh": "project",
    "seed": 0,
    "foreach": None,
}


def is_int(value: Any) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A finite real number (Python or numpy), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _integer(key: str, value: Any, minimum: int | None, optional: bool = False) -> int | None:
    if optional and value is None:
        return None
    if is_int(value) and (minimum is None or value >= minimum):
        return int(value)
    need = "an integer" if minimum is None else f"an integer >= {minimum}"
    raise ValueError(f"Invalid {key}: {value!r} (must be {'None or ' if optional else ''}{need})")


def _number(label: str, value: Any, minimum: float = 0.0, strict: bool = False) -> float:
    if is_real(value) and (value > minimum if strict else value >= minimum):
        return float(value)
    raise ValueError(f"Invalid {label}: {value!r} (must be a finite number {'>' if strict else '>='} {minimum:g})")


def _choice(key: str, value: Any, choices: Sequence[str]) -> str:
    if isinstance(value, str) and value in choices:
        return value
    raise ValueError(f"Invalid {key}: {value!r} (must be one of {', '.join(map(repr, choices))})")


def _foreach(value: Any) -> bool | None:
    if value is None or isinstance(value, (bool, np.bool_)):
        return None if value is None else bool(value)
    raise ValueError(f"Invalid foreach: {value!r} (must be None, True or False)")


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value == "auto"


def check_subspace(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The validated subspace settings of ``settings`` (a param group or the wrapper's arguments).

    Keys absent from ``settings`` take :data:`SUBSPACE_DEFAULTS`; keys that are not subspace settings are
    ignored. Returns a new dict of all the subspace keys with numbers as Python ``int`` / ``float`` and, when
    ``switch_fraction`` and ``total_steps`` are given, ``switch_step`` resolved from them. A bad value is a
    ``ValueError`` naming the key and the value.
    """
    s = {**SUBSPACE_DEFAULTS, **{k: v for k, v in settings.items() if k in SUBSPACE_DEFAULTS}}
    out = {
        "rank": None if s["rank"] is None else _integer("rank", s["rank"], 1),  # None: a full-space group
        "update_proj_gap": _integer("update_proj_gap", s["update_proj_gap"], 1),
        "scale": _number("scale", s["scale"], strict=True),
        "proj_type": _choice("proj_type", s["proj_type"], proj.PROJ_TYPES),
        "projection": s["projection"],
        "switch_step": "auto" if _is_auto(s["switch_step"]) else _integer("switch_step", s["switch_step"], 0,
                                                                              optional=True),
        "switch_fraction": s["switch_fraction"],
        "total_steps": _integer("total_steps", s["total_steps"], 1, optional=True),
        "state_on_refresh": _choice("state_on_refresh", s["state_on_refresh"], rules.STATE_ON_REFRESH),
        "seed": _integer("seed", s["seed"], None),
        "foreach": _foreach(s["foreach"]),
    }
    proj.resolve(out["projection"])
    if out["switch_step"] == "auto":
        if out["switch_fraction"] is not None:
            raise ValueError(f"Conflicting switch: switch_step='auto' but switch_fraction={out['switch_fraction']!r}; "
                             "give one of the two")
        if out["update_proj_gap"] < switching.MIN_PERIOD:
            raise ValueError(f"Invalid update_proj_gap: {out['update_proj_gap']!r} (switch_step='auto' needs >= "
                             f"{switching.MIN_PERIOD}: the test pairs the steps of a period after its refresh step "
                             f"and needs {switching.MIN_PAIRS} pairs)")
        return out
    out.update(resolve_switch(out["switch_step"], out["switch_fraction"], out["total_steps"]))
    return out


def resolve_switch(switch_step: int | None, switch_fraction: Any, total_steps: int | None) -> dict[str, Any]:
    """GoLore@x% given either way: ``switch_step`` K, or ``switch_fraction`` x/100 with ``total_steps`` T.

    K = round((1 − x/100)·T) as :meth:`golore_lab.methods.Method.switch_step` (``golore@X`` of the method
    names), so ``switch_fraction=0.2, total_steps=1000`` is ``switch_step=800``. Giving both ways is allowed
    only when they agree (a group whose step was resolved from its fraction, or a state dict of one); a
    conflict is a ``ValueError`` naming both.
    """
    if switch_fraction is None:
        if total_steps is not None:
            raise ValueError(f"Invalid total_steps: {total_steps!r} without switch_fraction (total_steps only "
                             "serves to resolve switch_fraction into switch_step)")
        return {"switch_step": switch_step, "switch_fraction": None, "total_steps": None}
    if not (is_real(switch_fraction) and 0 < switch_fraction <= 1):
        raise ValueError(f"Invalid switch_fraction: {switch_fraction!r} (must be a number 0 < x <= 1: the share "
                         "of the steps, at the end of the run, that use random subspaces)")
    if total_steps is None:
        raise ValueError(f"switch_fraction={switch_fraction!r} needs total_steps (the run's number of steps)")
    fraction = float(switch_fraction)
    resolved = Method(f"golore@{100 * fraction:g}", random_fraction=fraction).switch_step(total_steps)
    if switch_step is not None and switch_step != resolved:
        raise ValueError(f"Conflicting switch: switch_step={switch_step} but switch_fraction={fraction:g} with "
                         f"total_steps={total_steps} gives switch_step={resolved}; give one of the two")
    return {"switch_step": resolved, "switch_fraction": fraction, "total_steps": total_steps}


def check_rank_fits(rank: int, shape: tuple[int, ...], name: str, is_complex: bool = False) -> None:
    """A rank-r group holds real matrices with min(m, n) >= r; ``name`` names the parameter in the error.

    A complex matrix is refused: the projectors (an SVD, a Haar-random basis, the transport of the moments) are
    real-orthogonal, and a real basis of a complex gradient would train a different method than the one named.
    """
    if is_complex:
        raise ValueError(f"Parameter {name} is complex: a group with a rank holds real matrices only (put complex "
                         "parameters in a group without 'rank', where the rule runs on torch.view_as_real as "
                         "torch.optim's does)")
    if len(shape) != 2:
        raise ValueError(f"Parameter {name} has shape {tuple(shape)}: a group with a rank must hold matrices only "
                         "(put vectors and conv kernels in a group without 'rank')")
    if rank > min(shape):
        raise ValueError(f"Invalid rank: {rank} exceeds min(m, n) = {min(shape)} of parameter {name} "
                         f"with shape {tuple(shape)}")


def describe_setting(value: Any) -> str:
    """How a setting is shown in messages and saved in a state dict: a projector callable by its name."""
    if callable(value):
        return f"<callable {getattr(value, '__qualname__', type(value).__qualname__)}>"
    return repr(value)


# ---------------------------------------------------------------------------------------------- rule hyper-parameters
def check_lr(lr: Any) -> float | Tensor:
    """A finite learning rate >= 0: a number, or a floating tensor of one element (any shape, as ``torch.optim``
    takes it; kept as the same tensor)."""
    if isinstance(lr, Tensor):
        if lr.numel() == 1 and lr.is_floating_point() and math.isfinite(float(lr)) and float(lr) >= 0:
            return lr
    elif is_real(lr) and lr >= 0:
        return float(lr)
    raise ValueError(f"Invalid learning rate: {lr!r} (must be a finite number >= 0 or a floating tensor of one "
                     "element)")


def _maximize(value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ValueError(f"Invalid maximize: {value!r} (must be True or False)")


def check_adamw(hyper: Mapping[str, Any]) -> dict[str, Any]:
    """``lr``, ``betas`` (each in [0, 1)), ``eps`` >= 0, ``weight_decay`` >= 0 and ``maximize`` of the AdamW rule,
    validated (a group without ``maximize``, as older state dicts are, minimizes)."""
    betas = hyper["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"Invalid betas: {betas!r} (must be a pair)")
    for i, beta in enumerate(betas):
        if not (is_real(beta) and 0.0 <= beta < 1.0):
            raise ValueError(f"Invalid beta parameter at index {i}: {beta!r} (must be in [0, 1))")
    return {"lr": check_lr(hyper["lr"]), "betas": (float(betas[0]), float(betas[1])),
            "eps": _number("epsilon value", hyper["eps"]),
            "weight_decay": _number("weight_decay", hyper["weight_decay"]),
            "maximize": _maximize(hyper.get("maximize", False))}


def check_sgd(hyper: Mapping[str, Any]) -> dict[str, Any]:
    """``lr``, ``momentum`` >= 0, ``dampening``, ``weight_decay`` >= 0, ``nesterov`` and ``maximize`` of the SGD
    rule, validated.

    As ``torch.optim.SGD``: Nesterov needs a momentum > 0 and zero dampening.
    """
    momentum = _number("momentum value", hyper["momentum"])
    dampening = hyper["dampening"]
    if not is_real(dampening):
        raise ValueError(f"Invalid dampening value: {dampening!r} (must be a finite number)")
    nesterov = hyper["nesterov"]
    if not isinstance(nesterov, (bool, np.bool_)):
        raise ValueError(f"Invalid nesterov: {nesterov!r} (must be True or False)")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum > 0 and zero dampening "
                         f"(got momentum={hyper['momentum']!r}, dampening={dampening!r})")
    return {"lr": check_lr(hyper["lr"]), "momentum": momentum, "dampening": float(dampening),
            "weight_decay": _number("weight_decay", hyper["weight_decay"]), "nesterov": bool(nesterov),
            "maximize": _maximize(hyper.get("maximize", False))}


def check_group_keys(keys: Iterable[str], known: Iterable[str]) -> None:
    """Refuse a param-group key that looks like a misspelling of a ``known`` one, naming the key it resembles.

    Other keys are kept, as ``torch.optim`` keeps them (``"name"`` for logging, timm's ``"lr_scale"``). A key
    resembles a known key when their :class:`difflib.SequenceMatcher` ratio is >= 0.75 (``rnak`` ~ ``rank``,
    ``update_proj_gaps`` ~ ``update_proj_gap``, ``beta`` ~ ``betas``) unless it is that key with whole words
    added (``lr_scale``, ``weight_decay_scale``: ``scale`` / ``weight_decay`` and ``_``-joined words).
    """
    known = sorted(set(known))
    for key in keys:
        if key in known or not isinstance(key, str):
            continue
        close = [(difflib.SequenceMatcher(None, key, k).ratio(), k) for k in known
                 if not _composite(key, k)]
        ratio, meant = max(close, default=(0.0, None))
        if ratio >= 0.75:
            raise ValueError(f"Unknown param-group key {key!r}: did you mean {meant!r}? (other keys are kept, as "
                             "torch.optim keeps them; a key this close to a known one is taken for a misspelling)")


def _composite(key: str, known: str) -> bool:
    """``key`` is ``known`` with whole ``_``-separated words added (``lr_scale`` of ``scale``)."""
    words, inner = key.split("_"), known.split("_")
    return any(words[i:i + len(inner)] == inner for i in range(len(words) - len(inner) + 1))


# what gets a rank (its own module; imported here, after the checks it uses, so that spec names it all)
from .groups import (Choice, Targets, describe_param_groups, param_group_choices,  # noqa: E402
                     select_linears, subspace_param_groups)
