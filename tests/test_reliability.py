"""What MrGD does with NaN/inf gradients without a GradScaler, and what the raw ops do with leaves that
require grad: torch's behaviour, pinned (README "Reliability")."""

import pytest
import torch

import mrgd_ext  # noqa: F401  (registers the operators)
from mrgd_ext import MrGD


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("impl", [dict(fused=True), dict(foreach=True), dict(foreach=False, fused=False)])
def test_non_finite_gradient_is_applied_like_sgd(bad, impl):
    w = torch.zeros(3, requires_grad=True)
    v = torch.zeros(3, requires_grad=True)
    opt = MrGD([w], plan=[0.1, 0.2], **impl)
    sgd = torch.optim.SGD([v], lr=0.1, **impl)
    for p in (w, v):
        p.grad = torch.tensor([1.0, bad, 1.0])
    opt.step()
    sgd.step()
    torch.testing.assert_close(w.detach(), v.detach(), equal_nan=True)
    assert not torch.isfinite(w[1]) and int(opt.param_groups[0]["cycle_position"]) == 1


def test_raw_op_updates_a_leaf_that_requires_grad_like_torch_fused_sgd():
    w = torch.zeros(3, requires_grad=True)
    torch.ops.mrgd_ext.multirate_step_([w], [torch.ones(3)], 0.5, 0.0, False, None, None)
    torch.testing.assert_close(w.detach(), torch.full((3,), -0.5))
    v = torch.zeros(3, requires_grad=True)
    torch._fused_sgd_([v], [torch.ones(3)], [], weight_decay=0.0, momentum=0.0, lr=0.5, dampening=0.0,
                      nesterov=False, maximize=False, is_first_step=True)
    torch.testing.assert_close(v.detach(), w.detach())
