"""golore_lab: GaLore, GoLore and large-batch GaLore, exact and fast.

The optimizers (:class:`SubspaceAdamW`, :class:`SubspaceSGD`) are drop-in ``torch.optim`` optimizers that take
galore-torch's param-group keys; :func:`subspace_param_groups` builds those groups from a model (and
:func:`describe_param_groups` lists the choice); :mod:`golore_lab.spec` checks every setting;
:mod:`golore_lab.projection` holds the subspace choices, :mod:`golore_lab.rules` the subspace rules,
:mod:`golore_lab.counterexample` the paper's counterexample. :class:`SubspaceModel` (:mod:`golore_lab.wrapper`) is
the same algorithm as a model wrapper trained by plain ``torch.optim`` optimizers.
"""
from .optim import SubspaceAdamW, SubspaceOptimizer, SubspaceSGD, microbatches
from .projection import random_stiefel
from .spec import describe_param_groups, subspace_param_groups
from .wrapper import SubspaceModel

__all__ = ["SubspaceAdamW", "SubspaceSGD", "SubspaceOptimizer", "microbatches", "random_stiefel", "SubspaceModel",
           "subspace_param_groups", "describe_param_groups"]
__version__ = "0.1.0"
