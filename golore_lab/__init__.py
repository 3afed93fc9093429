"""golore_lab: GaLore, GoLore and large-batch GaLore, exact and fast.

The optimizers (:class:`SubspaceAdamW`, :class:`SubspaceSGD`) are drop-in ``torch.optim`` optimizers that take
galore-torch's param-group keys; :mod:`golore_lab.projection` holds the subspace choices, :mod:`golore_lab.rules`
the subspace rules, :mod:`golore_lab.counterexample` the paper's counterexample.
"""
from .optim import SubspaceAdamW, SubspaceOptimizer, SubspaceSGD, microbatches
from .projection import random_stiefel

__all__ = ["SubspaceAdamW", "SubspaceSGD", "SubspaceOptimizer", "microbatches", "random_stiefel"]
__version__ = "0.1.0"
