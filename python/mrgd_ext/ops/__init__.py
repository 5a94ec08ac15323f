"""The compiled operators (``torch.ops.mrgd_ext.*``): their registry (names, fake implementations,
references, dtypes: :mod:`mrgd_ext.ops.registry`), validated Python wrappers and pure-torch references.

Importing this package loads the compiled library, which registers the operators with the dispatcher.
"""

from mrgd_ext.ops.lanczos_ops import block_orthogonalize_, has_block_orthogonalize_kernel
from mrgd_ext.ops.step_ops import (
    build_info,
    has_kernel,
    multirate_step_,
    subspace_momentum_step_,
    subspace_project,
    subspace_step_,
)

__all__ = [
    "build_info",
    "has_kernel",
    "multirate_step_",
    "subspace_project",
    "subspace_step_",
    "subspace_momentum_step_",
    "block_orthogonalize_",
    "has_block_orthogonalize_kernel",
]
