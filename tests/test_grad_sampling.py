"""Oracle tests of the gradient plumbing on an analytic, parameterised velocity (float64)."""

import pytest
import torch

from rewardflow.sampling.grad import (
    checkpointed,
    consistency_weight,
    leap_distance,
    leap_rollout,
    renoised_last_step,
    stopped_euler,
    truncated_euler,
)
from rewardflow.sampling.schedules import sd3_schedule

T = 6
SIGMAS = sd3_schedule(T, 3.0).double()


def velocity_fn(theta):
    """v(x, sigma) = a x + b sigma + c tanh(x), elementwise: nonzero d_x v, analytic everything."""
    a, b, c = theta

    def v(x, sigma):
        return a * x + b * torch.as_tensor(sigma, dtype=x.dtype) + c * torch.tanh(x)

    return v


THETA0 = torch.tensor([-0.7, 0.4, 0.3], dtype=torch.float64)
X_INIT = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
W = torch.randn(2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def finite_difference(f, theta, h=1e-6):
    return torch.stack([(f(theta + h * e) - f(theta - h * e)) / (2 * h) for e in torch.eye(len(theta)).double()])


def autograd(f, theta):
    th = theta.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(th), th)
    return g


@pytest.mark.parametrize("grad_from", [0, 2, T - 1])
def test_truncated_euler_gradient_matches_finite_differences(grad_from):
    """The gradient with steps < grad_from cut is the derivative of the chain whose early steps use fixed weights."""

    def truncated_loss(theta):
        return (W * truncated_euler(velocity_fn(theta), X_INIT, SIGMAS, grad_from=grad_from)).sum()

    def split_chain(theta):  # early steps with the fixed theta0, the rest with theta: no stop-gradient needed
        x = X_INIT
        for i in range(T):
            v = velocity_fn(THETA0 if i < grad_from else theta)(x, SIGMAS[i])
            x = x + (SIGMAS[i + 1] - SIGMAS[i]) * v
        return (W * x).sum()

    got = autograd(truncated_loss, THETA0)
    assert torch.allclose(got, finite_difference(split_chain, THETA0), atol=1e-7)
    if grad_from == 0:  # full backprop is the derivative of the whole chain
        assert torch.allclose(got, finite_difference(truncated_loss, THETA0), atol=1e-7)
    assert got.abs().max() > 0


def test_stopped_euler_returns_the_clean_prediction_with_one_step_of_gradient():
    m = 3

    def loss(theta):
        return (W * stopped_euler(velocity_fn(theta), X_INIT, SIGMAS, m)[0]).sum()

    with torch.no_grad():
        x = X_INIT
        for i in range(m):
            x = x + (SIGMAS[i + 1] - SIGMAS[i]) * velocity_fn(THETA0)(x, SIGMAS[i])
    expected_value = x - SIGMAS[m] * velocity_fn(THETA0)(x, SIGMAS[m])
    prediction, real = stopped_euler(velocity_fn(THETA0), X_INIT, SIGMAS, m)
    assert torch.allclose(prediction, expected_value)
    assert torch.allclose(real, truncated_euler(velocity_fn(THETA0), X_INIT, SIGMAS, grad_from=T), atol=1e-12)
    # d/dtheta of x_m - s v_theta(x_m, s) with x_m fixed: -s (x_m, s, tanh x_m) weighted by W
    s = SIGMAS[m]
    by_hand = -s * torch.stack([(W * x).sum(), (W * s).sum(), (W * torch.tanh(x)).sum()])
    assert torch.allclose(autograd(loss, THETA0), by_hand, atol=1e-12)
    with pytest.raises(ValueError, match="stop"):
        stopped_euler(velocity_fn(THETA0), X_INIT, SIGMAS, T)
    with pytest.raises(ValueError, match="grad_from"):
        truncated_euler(velocity_fn(THETA0), X_INIT, SIGMAS, grad_from=T + 1)


def test_checkpointing_changes_memory_not_gradients():
    def loss(theta, wrap):
        v = velocity_fn(theta)
        return (W * truncated_euler(wrap(v), X_INIT, SIGMAS)).sum()

    assert torch.allclose(
        autograd(lambda t: loss(t, checkpointed), THETA0), autograd(lambda t: loss(t, lambda v: v), THETA0)
    )


def test_renoised_last_step_samples():
    x0 = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    s = float(SIGMAS[-2])
    outs = renoised_last_step(velocity_fn(THETA0), x0, s, 3, torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(4)
    for out in outs:  # x_i = (1 - s) x0 + s eps_i, denoised by one Euler step to 0
        xi = (1 - s) * x0 + s * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        assert torch.allclose(out, xi - s * velocity_fn(THETA0)(xi, s))
    assert not torch.allclose(outs[0], outs[1])


K, J = 1, 4


def leap_loss(theta, alpha, tau=1e-3):
    out = leap_rollout(velocity_fn(theta), X_INIT, SIGMAS, K, J, alpha=alpha, tau=tau)
    return (W * out.x0).sum()


def test_leap_connectors_keep_the_real_trajectory_values():
    out = leap_rollout(velocity_fn(THETA0), X_INIT, SIGMAS, K, J, alpha=0.3, tau=0.1)
    plain = truncated_euler(velocity_fn(THETA0), X_INIT, SIGMAS, grad_from=T)
    assert torch.allclose(out.x0, plain, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_leap_gradient_is_the_hand_derived_decomposition(alpha):
    """d x0 / d theta = -D dv_k - s_j dv_j + alpha s_j D (d_x v_j) dv_k, D = s_k - s_j (reference 4.2, item 4)."""
    a, b, c = THETA0
    xs = [X_INIT]
    with torch.no_grad():
        for i in range(T):
            xs.append(xs[-1] + (SIGMAS[i + 1] - SIGMAS[i]) * velocity_fn(THETA0)(xs[-1], SIGMAS[i]))
    s_k, s_j = SIGMAS[K], SIGMAS[J]
    d = s_k - s_j

    def dv_dtheta(x, s):  # [3, B, N]: derivative of v wrt (a, b, c)
        return torch.stack([x, torch.full_like(x, float(s)), torch.tanh(x)])

    dx_vj = a + c * (1 - torch.tanh(xs[J]) ** 2)  # elementwise Jacobian of v at (x_j, s_j)
    dv_k, dv_j = dv_dtheta(xs[K], s_k), dv_dtheta(xs[J], s_j)
    d_x0 = -d * dv_k - s_j * dv_j + alpha * s_j * d * dx_vj * dv_k
    by_hand = (W * d_x0).flatten(1).sum(dim=1)
    assert torch.allclose(autograd(lambda t: leap_loss(t, alpha), THETA0), by_hand, atol=1e-12)


def test_consistency_weight_by_hand():
    leap = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    real = torch.tensor([[1.5, 1.0], [0.01, -0.01]])
    d = leap_distance(leap, real, tau=0.1)
    assert d.tolist() == pytest.approx([0.75, 0.1])  # mean |diff| = 0.75; 0.01 floored at tau
    assert consistency_weight(d, torch.tensor([0.25, 0.1], dtype=torch.float64)).tolist() == pytest.approx([1.0, 5.0])
    out = leap_rollout(velocity_fn(THETA0), X_INIT, SIGMAS, K, J, alpha=0.3, tau=0.1)
    assert torch.allclose(out.weight, 1 / (out.d_j + out.d_0)) and (out.weight <= 5.0).all()
    with pytest.raises(ValueError, match="0 <= k < j"):
        leap_rollout(velocity_fn(THETA0), X_INIT, SIGMAS, 3, 3, alpha=0.3, tau=0.1)
