"""The distillation losses against an independent float64 reading of the formulas."""

import pytest
import torch
import torch.nn.functional as F

from dkd_det.losses import decoupled_kd, dkd_loss, kd_loss


def reference_parts(z_s, z_t, target, T):
    """TCKD and NCKD in float64, written from the paper's definitions with explicit sums
    over probabilities (a different computation from the library's log-space one)."""
    z_s, z_t = z_s.double() / T, z_t.double() / T
    tckd, nckd = [], []
    for zs, zt, t in zip(z_s, z_t, target.tolist()):
        # Shift by the max: softmax is invariant to it and exp stays representable.
        ps, pt = torch.exp(zs - zs.max()), torch.exp(zt - zt.max())
        ps, pt = ps / ps.sum(), pt / pt.sum()
        others = [j for j in range(len(zs)) if j != t]

        # log(1 - p_t) as log of a sum of the others: 1 - p_t loses everything when p_t ~ 1.
        def log_nt(z):
            m = z[others].max()
            return (
                m
                + torch.log(torch.exp(z[others] - m).sum())
                - (z.max() + torch.log(torch.exp(z - z.max()).sum()))
            )

        def log_pt(z):
            return z[t] - (z.max() + torch.log(torch.exp(z - z.max()).sum()))

        bt = [log_pt(zt), log_nt(zt)]
        bs = [log_pt(zs), log_nt(zs)]
        tckd.append(sum(torch.exp(a) * (a - b) for a, b in zip(bt, bs)))
        hs = zs[others] - zs[others].max()
        ht = zt[others] - zt[others].max()
        lhs = hs - torch.log(torch.exp(hs).sum())
        lht = ht - torch.log(torch.exp(ht).sum())
        nckd.append((torch.exp(lht) * (lht - lhs)).sum())
    return torch.stack(tckd).mean() * T * T, torch.stack(nckd).mean() * T * T


def random_case(n=64, c=11, scale=3.0, seed=0, background_share=0.5):
    g = torch.Generator().manual_seed(seed)
    z_s = torch.randn(n, c, generator=g) * scale
    z_t = torch.randn(n, c, generator=g) * scale
    target = torch.randint(0, c - 1, (n,), generator=g)
    # Detection: most sampled regions are background, the last class (index K of K+1).
    target[torch.rand(n, generator=g) < background_share] = c - 1
    return z_s, z_t, target


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("scale", [1.0, 10.0, 100.0, 1e4])
def test_parts_match_float64_reference(T, scale):
    z_s, z_t, target = random_case(scale=scale, seed=int(T * 10 + scale) % 1000)
    tckd, nckd = decoupled_kd(z_s, z_t, target, T)
    ref_t, ref_n = reference_parts(z_s, z_t, target, T)
    assert tckd.dtype == torch.float32 and torch.isfinite(tckd) and torch.isfinite(nckd)
    tol = dict(rtol=1e-4, atol=1e-5 * max(1.0, scale / T))
    torch.testing.assert_close(tckd.double(), ref_t, **tol)
    torch.testing.assert_close(nckd.double(), ref_n, **tol)
    torch.testing.assert_close(
        dkd_loss(z_s, z_t, target, alpha=1.0, beta=8.0, temperature=T).double(),
        ref_t + 8.0 * ref_n,
        **tol,
    )


def test_kd_is_tckd_plus_teacher_weighted_nckd_per_region():
    """The paper's identity KD = TCKD + (1 - p_t^T) NCKD, region by region."""
    z_s, z_t, target = random_case(n=32, scale=2.0, seed=3)
    T = 2.0
    for i in range(len(target)):
        tckd, nckd = decoupled_kd(z_s[i : i + 1], z_t[i : i + 1], target[i : i + 1], T)
        p_t = F.softmax(z_t[i] / T, dim=0)[target[i]]
        torch.testing.assert_close(
            kd_loss(z_s[i : i + 1], z_t[i : i + 1], T),
            tckd + (1 - p_t) * nckd,
            rtol=1e-4,
            atol=1e-6,
        )


def test_kd_matches_float64_kl():
    z_s, z_t, _ = random_case(scale=5.0, seed=4)
    for T in (1.0, 3.0):
        p_t = F.softmax(z_t.double() / T, 1)
        ref = (
            (p_t * (F.log_softmax(z_t.double() / T, 1) - F.log_softmax(z_s.double() / T, 1)))
            .sum(1)
            .mean()
            * T
            * T
        )
        torch.testing.assert_close(kd_loss(z_s, z_t, T).double(), ref, rtol=1e-5, atol=1e-6)


def test_identical_logits_give_zero():
    z, _, target = random_case(seed=5)
    tckd, nckd = decoupled_kd(z, z.clone(), target, 1.0)
    assert abs(tckd.item()) < 1e-6 and abs(nckd.item()) < 1e-6
    assert abs(kd_loss(z, z.clone()).item()) < 1e-6


def test_gradient_reaches_student_only_and_is_finite_at_extreme_logits():
    z_s, z_t, target = random_case(scale=1e4, seed=6)
    z_s.requires_grad_(True)
    z_t.requires_grad_(True)
    (dkd_loss(z_s, z_t, target, 1.0, 8.0, 1.0) + kd_loss(z_s, z_t, 2.0)).backward()
    assert z_s.grad is not None and torch.isfinite(z_s.grad).all() and z_s.grad.abs().sum() > 0
    assert z_t.grad is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_upcast(dtype):
    z_s, z_t, target = random_case(scale=50.0, seed=7)
    loss = dkd_loss(z_s.to(dtype), z_t.to(dtype), target)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    ref_t, ref_n = reference_parts(z_s.to(dtype), z_t.to(dtype), target, 1.0)
    torch.testing.assert_close(loss.double(), ref_t + 0.25 * ref_n, rtol=1e-4, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dkd_loss(z_s, z_t, target).dtype == torch.float32


def test_all_background_two_classes_and_empty_batch():
    z_s, z_t, _ = random_case(c=2, seed=8)
    target = torch.ones(len(z_s), dtype=torch.long)  # all background
    tckd, nckd = decoupled_kd(z_s, z_t, target, 1.0)
    ref_t, _ = reference_parts(z_s, z_t, target, 1.0)
    torch.testing.assert_close(tckd.double(), ref_t, rtol=1e-5, atol=1e-6)
    assert nckd.item() == 0.0  # one non-target class: nothing to distribute
    empty = torch.zeros(0, 5, requires_grad=True)
    loss = dkd_loss(empty, empty.detach(), torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()


def test_bad_arguments_are_clear_errors():
    z_s, z_t, target = random_case(seed=9)
    with pytest.raises(ValueError, match="same shape"):
        dkd_loss(z_s, z_t[:, :-1], target)
    with pytest.raises(ValueError, match="temperature"):
        dkd_loss(z_s, z_t, target, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(z_s, z_t, temperature=-1.0)


@pytest.mark.parametrize("T", [1.0, 3.0])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_gradient_matches_autograd_of_the_float64_reference(T, scale):
    """The closed-form backward against autograd through the paper's formulas, for any
    weighting of the two parts."""
    z_s, z_t, target = random_case(n=48, c=7, scale=scale, seed=int(10 * T + scale))
    ref_s = z_s.double().requires_grad_(True)
    ref_t, ref_n = reference_parts(ref_s, z_t.double(), target, T)
    z_s.requires_grad_(True)
    tckd, nckd = decoupled_kd(z_s, z_t, target, T)
    for a, b in ((1.0, 0.0), (0.0, 1.0), (0.7, 8.0)):
        (want,) = torch.autograd.grad(a * ref_t + b * ref_n, ref_s, retain_graph=True)
        (got,) = torch.autograd.grad(a * tckd + b * nckd, z_s, retain_graph=True)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6 * max(1.0, scale))
