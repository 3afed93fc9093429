"""golore_lab: GaLore, GoLore and large-batch GaLore, exact and fast.

The optimizers (:class:`SubspaceAdamW`, :class:`SubspaceSGD`) are drop-in ``torch.optim`` optimizers that take
galore-torch's param-group keys; :mod:`golore_lab.projection` holds the subspace choices, :mod:`golore_lab.rules`
the subspace rules, :mod:`golore_lab.counterexample` the paper's counterexample. :class:`SubspaceModel`
(:mod:`golore_lab.wrapper`) is the same algorithm as a model wrapper trained by plain ``torch.optim`` optimizers.
"""
from .optim import SubspaceAdamW, SubspaceOptimizer, SubspaceSGD, microbatches
from .projection import random_stiefel
from .wrapper import SubspaceModel

__all__ = ["SubspaceAdamW", "SubspaceSGD", "SubspaceOptimizer", "microbatches", "random_stiefel", "SubspaceModel"]
__version__ = "0.1.0"
