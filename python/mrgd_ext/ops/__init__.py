"""The compiled operators (``torch.ops.mrgd_ext.*``): Python wrappers, fake implementations and references.

Importing this package loads the compiled library, which registers the operators with the dispatcher.
"""

from mrgd_ext.ops.step_ops import build_info, has_kernel, multirate_step_, subspace_project, subspace_step_
from mrgd_ext.ops.lanczos_ops import block_orthogonalize_, has_block_orthogonalize_kernel

__all__ = [
    "build_info",
    "has_kernel",
    "multirate_step_",
    "subspace_project",
    "subspace_step_",
    "block_orthogonalize_",
    "has_block_orthogonalize_kernel",
]
