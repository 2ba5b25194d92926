"""SVPN: the fast power-iteration form must agree with the exact SVD form, and stay finite and fp32."""

import pytest
import torch

from pipeline.models.second_order import cross_covariance, svpn, svpn_svd


@pytest.mark.parametrize("shape", [(3, 12, 8), (2, 48, 24), (2, 7, 13)])
@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("alpha", [0.5, 0.25, 0.75])
def test_power_iteration_converges_to_svd(shape, top_k, alpha):
    g = torch.Generator().manual_seed(top_k * 100 + shape[1])
    q = torch.randn(*shape, generator=g, dtype=torch.float64)
    init = torch.randn(shape[-1], top_k, generator=g)
    fast = svpn(q, alpha=alpha, top_k=top_k, iters=300, init=init)
    exact = svpn_svd(q, alpha=alpha, top_k=top_k)
    assert fast.shape == q.shape and fast.dtype == torch.float32
    torch.testing.assert_close(fast, exact.float(), rtol=1e-4, atol=1e-4)


def test_top1_is_q_over_top_singular_value_power():
    q = torch.randn(4, 16, 10, dtype=torch.float64)
    s1 = torch.linalg.svdvals(q)[:, 0]
    expected = q / s1.pow(0.5)[:, None, None]
    torch.testing.assert_close(svpn(q, iters=200), expected.float(), rtol=1e-4, atol=1e-5)


def test_full_svd_reference_is_u_s_alpha_vt():
    q = torch.randn(2, 6, 5, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(q, full_matrices=False)
    torch.testing.assert_close(svpn_svd(q, 0.5).double(), u @ torch.diag_embed(s.sqrt()) @ vh, rtol=1e-5, atol=1e-5)
    # top_k = rank reproduces the full normalisation
    torch.testing.assert_close(svpn_svd(q, 0.5, top_k=5), svpn_svd(q, 0.5), rtol=1e-4, atol=1e-5)


def test_gradients_are_finite_including_the_learned_start_vector():
    q = torch.randn(8, 48, 24, requires_grad=True)
    init = torch.randn(24, 2, requires_grad=True)
    svpn(q, top_k=2, iters=1, init=init).square().sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(init.grad).all()
    assert init.grad.abs().sum() > 0  # the start vector is learnable through deflation and the iteration


def test_zero_matrix_does_not_divide_by_zero():
    q = torch.zeros(2, 8, 4, requires_grad=True)
    out = svpn(q)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_input_is_normalised_in_fp32(dtype):
    q = torch.randn(4, 48, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = svpn(q.to(dtype), iters=50)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, svpn_svd(q.to(dtype).float(), top_k=1), rtol=2e-3, atol=2e-3)


def test_cross_covariance_matches_definition():
    x1, x2 = torch.randn(3, 5, 20), torch.randn(3, 4, 20)
    c1, c2 = x1 - x1.mean(-1, keepdim=True), x2 - x2.mean(-1, keepdim=True)
    torch.testing.assert_close(cross_covariance(x1, x2), torch.einsum("bin,bjn->bij", c1, c2) / 20)
    with pytest.raises(ValueError, match="equal B and N"):
        cross_covariance(x1, torch.randn(3, 4, 19))


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="top_k=9"):
        svpn(torch.randn(1, 8, 4), top_k=9)
    with pytest.raises(ValueError, match=r"\(B, m, n\)"):
        svpn(torch.randn(8, 4))
