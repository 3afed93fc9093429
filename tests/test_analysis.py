"""Subspace-noise metrics: properties, a float64 reference, the tracker, and the counterexample's claims."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from golore_lab import SubspaceAdamW, analysis
from golore_lab import counterexample as ce
from golore_lab.projection import random_stiefel


def test_random_captured_fraction_averages_r_over_m():
    """E κ = r/m for Haar P and any fixed G. Over N draws the mean's standard error is below
    sqrt(r/m (1 − r/m) / N) (κ ∈ [0, 1] with mean r/m), so 4 of those is the tolerance."""
    g = torch.Generator().manual_seed(0)
    G = torch.randn(12, 30, generator=g, dtype=torch.float64) @ torch.diag(torch.linspace(0.1, 5, 30)).double()
    m, r, N = 12, 3, 4000
    bases = torch.stack([random_stiefel(m, r, g, torch.float64) for _ in range(N)])
    kappa = analysis.captured_fraction(bases, G.expand(N, m, 30))
    assert abs(kappa.mean().item() - r / m) < 4 * (r / m * (1 - r / m) / N) ** 0.5


def test_svd_captured_fraction_is_exactly_zero_in_the_no_b_instance():
    p = ce.Counterexample(linear_term=False)
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        xi = next(p.noise_periods(g, 1))[0]
        P = analysis.top_subspace(p.stochastic_grad(p.x0, xi), p.r)
        assert analysis.captured_fraction(P, p.grad(p.x0)).item() == 0.0


def test_principal_angles():
    g = torch.Generator().manual_seed(2)
    G = torch.randn(9, 14, generator=g, dtype=torch.float64)
    P = analysis.top_subspace(G, 3)
    assert analysis.principal_angles(P, G).abs().max().item() < 1e-7
    Q = analysis.top_subspace(G, 6)[:, 3:]  # the next three singular directions: orthogonal to the top three
    torch.testing.assert_close(analysis.principal_angles(Q, G, rank=3), torch.full((3,), np.pi / 2, dtype=torch.float64))
    right = analysis.top_subspace(G, 2, "right")
    assert analysis.principal_angles(right, G, side="right").abs().max().item() < 1e-7


def _reference(P, G, Gs, side):
    """Plain numpy float64: the definitions written out."""
    P, G, Gs = (np.asarray(x, dtype=np.float64) for x in (P, G, Gs))
    proj = (lambda A: P.T @ A) if side == "left" else (lambda A: A @ P)
    kappa = np.sum(proj(G) ** 2) / np.sum(G ** 2)
    U, _, Vt = np.linalg.svd(G)
    top = U[:, : P.shape[1]] if side == "left" else Vt[: P.shape[1]].T
    angles = np.sort(np.arccos(np.clip(np.linalg.svd(P.T @ top, compute_uv=False), -1, 1)))
    share = np.sum(proj(Gs - G) ** 2) / np.sum(proj(Gs) ** 2)
    return kappa, angles, np.linalg.norm(G, 2), share


@pytest.mark.parametrize("side", ["left", "right"])
def test_metrics_agree_with_float64_reference(side):
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        G = torch.randn(7, 11, generator=g)
        Gs = G + 0.5 * torch.randn(7, 11, generator=g)
        P = random_stiefel(7 if side == "left" else 11, 3, g)
        kappa, angles, norm, share = _reference(P, G, Gs, side)
        assert analysis.captured_fraction(P, G, side).item() == pytest.approx(kappa, rel=1e-5)
        np.testing.assert_allclose(analysis.principal_angles(P, G, side=side).numpy(), angles, atol=1e-4)
        assert analysis.signal_to_noise(G, 0.5).item() == pytest.approx(norm / 0.5, rel=1e-5)
        assert analysis.noise_share(P, G, Gs, side).item() == pytest.approx(share, rel=1e-4)


def test_metric_errors():
    with pytest.raises(ValueError, match=r"Invalid noise_scale: 0"):
        analysis.signal_to_noise(torch.ones(2, 2), 0)
    with pytest.raises(ValueError, match=r"Invalid side: 'top'"):
        analysis.captured_fraction(torch.eye(2), torch.ones(2, 2), "top")


def test_tracker_sees_every_refresh_and_stores_nothing_unless_asked():
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(6, 8))
    opt = SubspaceAdamW([{"params": [W], "param_names": ["w"], "rank": 2, "update_proj_gap": 3}], lr=0.01,
                        switch_step=6)
    target = torch.randn(6, 8)
    with analysis.ProjectionTracker(opt, {"captured": lambda r: analysis.captured_fraction(r.basis, W.detach() - target,
                                                                                          r.side)}) as tracker:
        for _ in range(10):
            opt.zero_grad()
            ((W - target) ** 2).sum().mul(0.5).backward()
            opt.step()
    frame = tracker.frame()
    assert list(frame.step) == [0, 3, 6, 9] and list(frame.kind) == ["svd", "svd", "random", "random"]
    assert (frame.name == "'w'").all() and tracker.bases == []
    assert frame.captured.iloc[0] > frame.captured.iloc[2]  # the SVD of the exact gradient beats a random basis
    W.grad = torch.randn(6, 8)
    for _ in range(3):
        opt.step()
    assert len(tracker.rows) == 4  # removed on exit
    keeper = analysis.ProjectionTracker(opt, keep_bases=True)
    while not opt.refresh_due():
        opt.step()
    assert keeper.bases == []
    opt.step()
    assert len(keeper.bases) == 1 and keeper.bases[0].shape == (6, 2)


def test_galore_captures_nothing_exactly_when_every_singular_value_of_m_is_below_sigma():
    """Counterexample, SGD settings of Figure 1 (shortened): the basis chosen at refresh t0 captures 0 of ∇f iff
    the largest singular value of M at t0 (logged at the previous period end) is below σ."""
    p = ce.Counterexample()
    frame = ce.run(p, methods=["galore"], steps=80_000, seeds=[0])
    captured, top = frame.captured.to_numpy()[1:], frame.top_sv.to_numpy()[:-1]
    assert np.array_equal(captured == 0.0, top < p.sigma)
    assert (captured == 0).any() and (captured > 0).any()


def test_golore_captures_r_over_m_on_average():
    p = ce.Counterexample()
    frame = ce.run(p, methods=["golore@100"], optimizer="sgd", steps=50_000, seeds=range(4))
    assert frame.captured.iloc[1:].mean() == pytest.approx(p.r / p.n, abs=0.02)


def test_snr_threshold_moves_like_sigma_over_sqrt_b():
    from golore_lab.artefacts import fig2_snr_sweep

    sweep = fig2_snr_sweep.run(fig2_snr_sweep.Config("default", trials=200))
    threshold = analysis.snr_threshold(sweep, 0.5)
    assert threshold[1] == pytest.approx(1.0, rel=0.1)  # one sample: the top direction of ∇f must beat σ itself
    big = threshold[threshold.index > 1]
    slope = np.polyfit(np.log(big.index), np.log(big.to_numpy()), 1)[0]
    assert slope == pytest.approx(-0.5, abs=0.1)
    random = sweep[sweep.method == "random"].captured
    assert random.mean() == pytest.approx(0.4, abs=0.02)


def test_isotropic_noise_lets_galore_converge():
    """v2 of the paper: under rotation-invariant noise of the same total variance GaLore reaches f*."""
    p = ce.Counterexample(noise="isotropic")
    frame = ce.run(p, methods=["galore"], seeds=[0], **{k: v for k, v in ce.PAPER["sgd"].items() if k != "methods"})
    assert frame.loss.iloc[-1] - p.f_star < 0.05
    aniso = ce.run(ce.Counterexample(), methods=["galore"], seeds=[0],
                   **{k: v for k, v in ce.PAPER["sgd"].items() if k != "methods"})
    assert aniso.loss.iloc[-1] - p.f_star > 2.0


def test_lm_noise_study_on_the_tiny_llama(tmp_path):
    """The real-model study runs end to end on the tiny LLaMA (real-text fixture corpus) and its numbers are
    consistent: the oracle subspace is the best rank-r subspace for G, every fraction lies in [0, 1]."""
    from lm_helpers import build_fixture_corpus

    from golore_lab.lm.data import load_corpus
    from golore_lab.lm.noise_study import run_study

    corpus = load_corpus(build_fixture_corpus(tmp_path))
    frame = run_study(model="tiny", steps=6, every=3, batch_size=4, large_factor=4, reference_windows=16, chunk=8,
                      rank=4, corpus=corpus, log=lambda *_: None)
    assert sorted(frame.step.unique()) == [0, 3, 6] and len(frame) == 3 * 2 * 7  # 2 layers x 7 linears
    for column in ("svd", "svd_large", "random", "oracle"):
        assert frame[column].between(0, 1 + 1e-9).all()
    assert (frame.oracle >= frame[["svd", "svd_large", "random"]].max(axis=1) - 1e-9).all()
    assert (frame.snr > 0).all() and set(frame.kind) == {"attn", "mlp"}
    assert frame.random.mean() == pytest.approx((4 / frame.dim).mean(), abs=0.1)
