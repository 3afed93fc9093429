"""Checkpoints: the state-dict layout and every check of ``load_state_dict``, through torch's state-dict hooks.

``state_dict()`` is torch's, followed by a post-hook (:meth:`Checkpoints._saved_layout`) that saves a projector
callable by name and GoLore@auto's fixed layout for row-sharded parameters. ``load_state_dict()`` is torch's, with
a pre-hook (:meth:`Checkpoints._checked_load`) that runs after the user's pre-hooks, turns GoLore@auto's layout
back into the live one and validates the hooked dict in full before anything changes, and a post-hook
(:meth:`Checkpoints._finish_load`), run before the user's, that puts the checked settings into the groups.
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor

from .. import distributed
from .. import spec
from .. import switching
from ..spec import SUBSPACE_DEFAULTS

#: param-group keys added after the first state dicts were saved: a saved group without one takes the default
OPTIONAL_KEYS = ("maximize",)


def saved_callable(value: Any) -> bool:
    """A projector callable as ``state_dict()`` saves it: ``"<callable name>"``."""
    return isinstance(value, str) and value.startswith("<callable")


def subclasses(cls: type) -> list[type]:
    return [sub for direct in cls.__subclasses__() for sub in (direct, *subclasses(direct))]


class Checkpoints:
    """``state_dict`` / ``load_state_dict`` of :class:`golore_lab.optim.SubspaceOptimizer` (a mixin)."""

    def _install_checkpoint_hooks(self) -> None:
        """The state-dict layout and the load checks, through torch's own state-dict hooks (once per object)."""
        if "_checkpoint_hooks" in self.__dict__:
            return
        self._checkpoint_hooks = (self.register_state_dict_post_hook(Checkpoints._saved_layout),
                                  self.register_load_state_dict_pre_hook(Checkpoints._checked_load),
                                  self.register_load_state_dict_post_hook(Checkpoints._finish_load))

    def state_dict(self) -> dict[str, Any]:
        """As ``Optimizer.state_dict``; a user's projector object is saved by name only (tensors-only state).

        GoLore@auto's state of a row-sharded (FSDP2) parameter is saved in a layout of fixed keys and shapes
        (:meth:`_auto_saved`), as ``torch.distributed.checkpoint`` needs; on the right side this sums each
        rank's share of the period's pair products over the ranks, so ``state_dict()`` is then a collective
        (one all-reduce for all such parameters): call it on every rank, as ``get_optimizer_state_dict`` does.
        """
        return super().state_dict()

    @staticmethod
    def _saved_layout(self: "Checkpoints", state: dict[str, Any]) -> dict[str, Any]:
        """The state-dict post hook: a projector callable by its name, GoLore@auto's sharded layout."""
        for group in state["param_groups"]:
            if callable(group["projection"]):
                group["projection"] = spec.describe_setting(group["projection"])
        self._auto_saved(state)
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any], *, keep_settings: bool = False) -> None:
        """As ``Optimizer.load_state_dict``, validated in full before anything changes.

        Refused with a ``ValueError`` naming the first mismatch, the optimizer left exactly as it was: a state
        dict of another optimizer class (``torch.optim.AdamW``'s, or ``SubspaceSGD``'s into ``SubspaceAdamW``),
        another number of groups or of parameters per group, other param-group keys, a hyper-parameter or
        setting that the constructor would refuse (``rank=0``, ``lr=nan``), a state tensor whose shape does not
        fit its parameter, rank and side, and -- unless ``keep_settings`` -- a subspace setting (``rank``,
        ``switch_step``, ``switch_fraction``, ``total_steps``, ``seed`` ... see :data:`SUBSPACE_DEFAULTS`) that
        differs from this optimizer's: the run would silently change method.

        ``keep_settings=True`` keeps this optimizer's subspace settings instead of the saved ones (e.g. to move
        the switch of a resumed run); the saved state must still fit them. The rule's hyper-parameters (``lr``,
        ``betas``, ``momentum`` ...) are taken from the state dict, as torch does: a scheduler's learning rate
        must survive a resume. A projector callable is saved by name; the optimizer keeps its own object.

        The checks run in a load-state-dict pre-hook placed after the user's (``register_load_state_dict_pre_hook``),
        so they see the dict those hooks return (an upgraded older layout, a changed ``lr``); torch then loads that
        dict, and a post-hook placed before the user's puts the checked settings into the groups.
        """
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"Not an optimizer state dict (must be a dict with 'state' and 'param_groups'): "
                             f"{type(state_dict).__name__}")
        _, pre, post = self._checkpoint_hooks
        self._optimizer_load_state_dict_pre_hooks.move_to_end(pre.id)
        self._optimizer_load_state_dict_post_hooks.move_to_end(post.id, last=False)
        self._keep_settings = keep_settings
        try:
            super().load_state_dict(state_dict)
        finally:
            self.__dict__.pop("_keep_settings", None)
            self.__dict__.pop("_loading", None)

    @staticmethod
    def _checked_load(self: "Checkpoints", state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
        """The load pre-hook: GoLore@auto's saved layout turned live, then every check, before anything changes."""
        state_dict = self._auto_loaded(state_dict)
        self._loading = (state_dict, self._check_loadable(state_dict, self.__dict__.get("_keep_settings", False)))
        return state_dict

    @staticmethod
    def _finish_load(self: "Checkpoints") -> None:
        """The load post-hook: the checked settings (Python numbers, the live projector, kept settings) and
        GoLore@auto's statistic dtypes."""
        state_dict, settings = self.__dict__.pop("_loading")
        self._restore_statistic_dtypes(state_dict)
        for group, checked in zip(self.param_groups, settings):
            # a tensor lr stays torch's own copy of the saved one
            group.update({k: v for k, v in checked.items() if not isinstance(v, Tensor)})

    def _restore_statistic_dtypes(self, state_dict: Mapping[str, Any]) -> None:
        """Undo torch's cast of GoLore@auto's float32 statistic to a half-precision parameter's dtype.

        ``Optimizer.load_state_dict`` casts every floating state tensor but ``step`` to its parameter's dtype;
        the statistic is kept in float32 for bf16 parameters (:func:`golore_lab.switching.start_period`), so a
        resumed bf16 run would otherwise test rounded pair products. The saved tensors are put back as saved.
        """
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for index, p in zip(saved_ids, params):
            saved = state_dict["state"].get(index, {})
            for key in ("auto_prev", "auto_probe_prev", "auto_pairs"):
                value = saved.get(key)
                if (isinstance(value, Tensor) and type(value) is Tensor and key in self.state[p]
                        and value.dtype != self.state[p][key].dtype):
                    self.state[p][key] = value.to(device=self.state[p][key].device, copy=True)

    def _check_loadable(self, state_dict: Mapping[str, Any], keep_settings: bool) -> list[dict[str, Any]]:
        """Everything :meth:`load_state_dict` refuses; returns each group's settings after the load."""
        cls = type(self).__name__
        if not (isinstance(state_dict, Mapping) and isinstance(state_dict.get("param_groups"), (list, tuple))
                and isinstance(state_dict.get("state"), Mapping)):
            raise ValueError(f"Not an optimizer state dict (must be a dict with 'state' and 'param_groups'): "
                             f"{type(state_dict).__name__}")
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"The state dict has {len(saved_groups)} param group(s), this {cls} has "
                             f"{len(self.param_groups)}")
        expected = self._known_keys() | {"params"}
        out = []
        for index, (live, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if not isinstance(saved, Mapping):
                raise ValueError(f"Param group {index} of the state dict is a {type(saved).__name__}, not a dict")
            keys = set(saved) | set(OPTIONAL_KEYS)  # other keys ("initial_lr", "name") travel with the group
            if not expected <= keys:
                raise ValueError(self._foreign_keys(index, set(saved), expected))
            if len(saved["params"]) != len(live["params"]):
                raise ValueError(f"Param group {index} of the state dict has {len(saved['params'])} parameter(s), "
                                 f"this {cls}'s has {len(live['params'])}")
            candidate = dict(saved, params=live["params"], param_names=live.get("param_names"))
            if saved_callable(saved["projection"]):
                candidate["projection"] = live["projection"]  # a saved name cannot be validated; compared below
            try:
                checked = self._check_group(candidate, index)
            except ValueError as error:
                raise ValueError(f"Param group {index} of the state dict: {error}") from None
            for key in SUBSPACE_DEFAULTS:
                mine = spec.describe_setting(live[key])
                saved_name = key == "projection" and saved_callable(saved[key])
                theirs = saved[key] if saved_name else spec.describe_setting(checked[key])
                if mine != theirs and not keep_settings:
                    raise ValueError(f"Param group {index}: the state dict's {key}={theirs} differs from this "
                                     f"{cls}'s {key}={mine} (load_state_dict(..., keep_settings=True) keeps "
                                     "this optimizer's settings)")
            if keep_settings:
                checked.update({key: live[key] for key in SUBSPACE_DEFAULTS})
            for i, (saved_id, p) in enumerate(zip(saved["params"], live["params"])):
                state = saved_state.get(saved_id)
                if state:
                    self._check_param_state(state, checked, p, self._param_name(live, index, i))
            out.append(checked)
        return out

    def _foreign_keys(self, index: int, keys: set[str], expected: set[str]) -> str:
        cls = type(self).__name__
        missing = sorted(expected - keys - set(OPTIONAL_KEYS))
        what = f"param group {index} of the state dict lacks keys {missing}"
        if not keys & (set(SUBSPACE_DEFAULTS) - {"foreach"}):  # torch.optim groups have "foreach" too
            return (f"Not a subspace optimizer's state dict (a torch.optim one?): {what}; it cannot be loaded "
                    f"into {cls}")
        for other in subclasses(Checkpoints):
            if (getattr(other, "rule", None) is not None and other is not type(self)
                    and other._known_keys() - set(OPTIONAL_KEYS) <= keys):
                return f"A {other.__name__} state dict cannot be loaded into {cls}: {what}"
        return f"Not a {cls} state dict: {what}"

    def _check_param_state(self, state: Mapping[str, Any], settings: Mapping[str, Any], p: Tensor,
                           name: str) -> None:
        """A saved per-parameter state fits parameter ``p`` (named ``name``) under ``settings``."""
        shape = tuple(p.shape)
        rank = settings["rank"]
        if rank is None:
            tensors = {key: shape for key in self.rule.state}
        else:
            side = distributed.ops(p, name).side(shape, settings["proj_type"])  # FSDP2: as step() chooses it
            m, n = shape
            projected = (rank, n) if side == "left" else (m, rank)
            tensors = {key: projected for key in self.rule.state}
            tensors["proj"] = (m if side == "left" else n, rank)
        counters = ("step", "moment_start")
        for key, value in state.items():
            if key in switching.STATE_KEYS and settings["switch_step"] == "auto":
                continue  # GoLore@auto's period sums and decision record (switching.start_period shapes them)
            if key in counters:
                if not (spec.is_int(value) and value >= 0):
                    raise ValueError(f"State {key!r} of parameter {name} is {value!r} (must be an integer >= 0)")
            elif key not in tensors:
                raise ValueError(f"State of parameter {name} has an unknown entry {key!r} (a {type(self).__name__} "
                                 f"keeps {sorted([*counters, *tensors])})")
            elif not isinstance(value, Tensor) or tuple(value.shape) != tensors[key]:
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"State {key!r} of parameter {name} with shape {shape} is {got}; rank {rank} "
                                 f"implies {tensors[key]}")

