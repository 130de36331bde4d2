"""qlib.pact: PACT, learned activation clipping (Choi et al. 2018).

Reference: autograd through the paper's formulas, eq. 1-3:
``y = 0.5 (|x| - |x - alpha| + alpha)`` and ``y_q = y + (round(y / s) s - y).detach()``
(the STE through ``round``, ``s = alpha / (2**b - 1)`` held constant), whose gradients are
``d y_q / d x = 1`` on ``[0, alpha)`` and ``d y_q / d alpha = 1`` where ``x >= alpha``; the
forward values against ``torch.fake_quantize_per_tensor_affine`` on the clipped input.
"""

from __future__ import annotations

import pytest
import torch

from qlib.pact import PACTFakeQuantize, pact_fake_quantize, pact_qparams


def fresh_gen():
    return torch.Generator().manual_seed(torch.randint(2**31, (1,)).item() % 2**31)


def paper_pact(x, alpha, bits):
    """Choi et al.: clip by eq. 1, quantize with the STE (the scale does not carry a gradient)."""
    y = 0.5 * (x.abs() - (x - alpha).abs() + alpha)
    s = (alpha / (2**bits - 1)).detach()
    return y + (torch.round(y.detach() * (1.0 / s)) * s - y).detach()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gradients_are_autograd_of_the_papers_formula(bits):
    g = fresh_gen()
    x = torch.randn(5000, generator=g) * 2
    dy = torch.randn(5000, generator=g)
    alpha0 = float(torch.rand(1, generator=g) * 2 + 0.5)
    grads = {}
    for name, fn in (("qlib", lambda x, a: pact_fake_quantize(x, a, bits)), ("paper", lambda x, a: paper_pact(x, a, bits))):
        xr = x.clone().requires_grad_(True)
        a = torch.tensor(alpha0, requires_grad=True)
        y = fn(xr, a)
        y.backward(dy)
        grads[name] = (y.detach(), xr.grad, a.grad)
    (yq, gx, ga), (yp, gxp, gap) = grads["qlib"], grads["paper"]
    assert torch.allclose(yq, yp, atol=1e-6)
    assert torch.equal(gx, gxp)                           # 1 on [0, alpha), 0 elsewhere
    assert torch.allclose(ga, gap, rtol=1e-5, atol=1e-5)  # the sum of dy over x >= alpha
    assert torch.allclose(ga, dy[x >= alpha0].sum(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_forward_is_pytorchs_fake_quantize_of_the_clipped_input(bits):
    g = fresh_gen()
    x = torch.randn(3000, generator=g) * 3
    alpha = torch.tensor(float(torch.rand(1, generator=g) * 3 + 0.2))
    scale, zp = pact_qparams(alpha, 0.0, 2**bits - 1)
    assert int(zp) == 0 and torch.isclose(scale, alpha / (2**bits - 1))
    ref = torch.fake_quantize_per_tensor_affine(torch.clamp(x, 0, float(alpha)), float(scale), 0, 0, 2**bits - 1)
    assert torch.equal(pact_fake_quantize(x, alpha, bits), ref)
    # the clipped range [0, alpha]: alpha itself is the top level
    assert pact_fake_quantize(torch.tensor([1e6, -1e6]), alpha, bits).tolist() == pytest.approx([float(alpha), 0.0])


def test_negative_inputs_use_a_fixed_lower_clip_and_an_affine_grid():
    g = fresh_gen()
    x = torch.randn(2000, generator=g, requires_grad=True)
    alpha = torch.tensor(1.5, requires_grad=True)
    y = pact_fake_quantize(x, alpha, 4, lower=-0.8)
    y.sum().backward()
    scale, zp = pact_qparams(alpha, -0.8, 15)
    assert torch.equal(y.detach(), torch.fake_quantize_per_tensor_affine(x.detach().clamp(-0.8, 1.5), float(scale),
                                                                         int(zp), 0, 15))
    assert y.min() >= -0.8 - scale / 2 and y.max() <= 1.5 + scale / 2  # 0.0 exact: the grid shifts by < s/2
    inside = (x >= -0.8) & (x < 1.5)
    assert torch.equal(x.grad, inside.float())
    assert alpha.grad.item() == float((x >= 1.5).sum())


def test_module_calibrates_learns_and_reports_its_grid():
    g = fresh_gen()
    fq = PACTFakeQuantize(bits=4)
    fq.calibrating = True
    for _ in range(3):
        fq(torch.relu(torch.randn(64, 8, generator=g)))
    fq.calibrating = False
    fq.initialize()
    assert float(fq.lower) == 0.0 and float(fq.alpha.detach()) > 0
    x = torch.relu(torch.randn(64, 8, generator=g)) * 2
    fq(x).pow(2).sum().backward()
    assert fq.alpha.grad is not None and fq.alpha.grad.item() != 0
    scale, zp = fq.qparams()
    assert int(zp) == 0 and torch.isclose(scale, fq.alpha.detach() / 15)
    # a frozen plain fake quantizer with these qparams gives the same values (what convert_qat builds)
    with torch.no_grad():
        assert torch.equal(fq(x), torch.fake_quantize_per_tensor_affine(x, float(scale), 0, 0, 15))
    fq.set_bits(2)
    assert fq.quant_max == 3 and torch.isclose(fq.qparams()[0], fq.alpha.detach() / 3)


def test_bad_inputs_say_what_is_expected():
    with pytest.raises(TypeError, match="alpha"):
        pact_fake_quantize(torch.randn(3), 1.0)
    with pytest.raises(ValueError, match="alpha"):
        pact_fake_quantize(torch.randn(3), torch.tensor(-1.0))
    with pytest.raises(ValueError, match="lower"):
        pact_fake_quantize(torch.randn(3), torch.tensor(1.0), lower=0.5)
    with pytest.raises(ValueError, match="no data"):
        PACTFakeQuantize().initialize()
    with pytest.raises(ValueError, match="bits"):
        PACTFakeQuantize(bits=1)
