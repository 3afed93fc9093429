"""golore_lab.lesson, the helpers of notebook 01: the step-by-step trace is the fast engine's run with every singular
value of M added, the numpy exercise's check accepts the solution and rejects wrong ones, and the small helpers
say what the notebook says they do."""
from __future__ import annotations

import numpy as np
import pytest

from golore_lab import counterexample as ce
from golore_lab import lesson
from golore_lab import theory as th


@pytest.fixture(scope="module")
def problem():
    return ce.Counterexample()


@pytest.mark.parametrize("noise", ["anisotropic", "gaussian", "isotropic"])
def test_trace_is_the_engine_with_all_singular_values(noise):
    """Same noise stream, same random bases: loss, κ and the largest singular value are the engine's, for every
    method family (GoLore@50 switches half-way; L.B. GaLore averages its refresh batch)."""
    problem = ce.Counterexample(noise=noise)
    methods = ["full", "galore", "golore@100", "golore@50", "lb-galore"]
    kwargs = dict(steps=600, lr=3e-3, update_proj_gap=10, log_every=10)
    mine = lesson.trace(problem, methods, seed=3, batch=5, **kwargs)
    engine = ce.run(problem, methods=methods, seeds=[3], batch=5, engine="fast", **kwargs)
    assert len(mine) == len(engine)
    for column, reference in (("loss", "loss"), ("captured", "captured"), ("s1", "top_sv")):
        a, b = mine[column].to_numpy(), engine[reference].to_numpy()
        assert np.array_equal(np.isnan(a), np.isnan(b))
        np.testing.assert_allclose(a[~np.isnan(a)], b[~np.isnan(b)], rtol=0, atol=1e-10, err_msg=column)
    final = mine.attrs["final_X"]["golore@100"]
    assert final.shape == (problem.n, problem.n) and np.isclose(problem.f(final).item(),
                                                                      mine[mine.method == "golore@100"].loss.iloc[-1],
                                                                      rtol=0, atol=1e-12)


def test_trace_singular_values_add_up_to_the_loss(problem):
    """While X₁₂ = 0 (GaLore and full training keep it there), f − f* = ½Σᵢ sᵢ(M)²: a check of all six values,
    not only the largest; GoLore moves X₁₂, so there f − f* ≥ ½Σᵢ sᵢ² strictly."""
    frame = lesson.trace(problem, ["full", "galore", "golore@100"], steps=300, log_every=30)
    half_sum = 0.5 * (lesson.singular_values(frame) ** 2).sum(axis=1)
    gap = frame.loss - problem.f_star
    exact = frame.method != "golore@100"
    np.testing.assert_allclose(gap[exact], half_sum[exact], rtol=1e-12, atol=1e-12)
    assert (gap[~exact & (frame.step > 0)] > half_sum[~exact & (frame.step > 0)] + 1e-6).all()
    assert lesson.singular_values(frame).shape[1] == problem.n - problem.r


def test_trace_refuses_what_it_cannot_run(problem):
    with pytest.raises(ValueError, match="log_every"):
        lesson.trace(problem, steps=100, log_every=7)
    with pytest.raises(ValueError, match="Invalid method: 'golore@auto'"):
        lesson.trace(problem, ["golore@auto"], steps=100)


def test_the_solution_passes_the_check(problem, capsys):
    table = lesson.check_numpy_galore(lesson.numpy_galore, problem, steps=500)
    assert list(table.quantity) == ["loss", "captured", "top_sv"] and (table.max_abs_difference < 1e-9).all()
    assert "your function" in capsys.readouterr().out


def test_the_skeleton_falls_back_to_the_solution(problem, capsys):
    def skeleton(problem, steps, lr, tau, seed=0):
        raise NotImplementedError("your code here")

    lesson.check_numpy_galore(skeleton, problem, steps=200)
    assert "package's solution" in capsys.readouterr().out


def _wrong_step(problem, steps, lr, tau, seed=0):
    return lesson.numpy_galore(problem, steps, lr * 1.01, tau, seed)


def _wrong_kappa(problem, steps, lr, tau, seed=0):
    loss, captured, top = lesson.numpy_galore(problem, steps, lr, tau, seed)
    return loss, captured * 0.5, top  # e.g. κ normalised by the stochastic gradient's norm instead of ∇f's


def _one_short(problem, steps, lr, tau, seed=0):
    return tuple(values[:-1] for values in lesson.numpy_galore(problem, steps, lr, tau, seed))


@pytest.mark.parametrize("student, message", [(_wrong_step, "loss differs from the engine first after step 1:"),
                                              (_wrong_kappa, "captured differs"),
                                              (_one_short, r"shape \(199,\), expected \(200,\)")])
def test_the_check_rejects_wrong_answers(problem, student, message):
    with pytest.raises(AssertionError, match=message):
        lesson.check_numpy_galore(student, problem, steps=200)


def test_galore_on_two_point_noise_does_not_depend_on_the_signs(problem):
    """Why the check may compare numbers step by step: other signs, same GaLore run."""
    a, b = lesson.numpy_galore(problem, 300, seed=0), lesson.numpy_galore(problem, 300, seed=1)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-12)


@pytest.mark.parametrize("rank", [3, 4, 5, 6])
def test_noise_slots_of_the_first_refresh(rank):
    p = ce.Counterexample(r=rank)
    above = int((p.m0_singular_values > p.sigma).sum())
    assert abs(lesson.noise_slots(p, p.x0) - max(0, rank - above)) < 1e-9


def test_lb_galore_law_helpers(problem):
    """B = 1 (GaLore) ends at the law's exact limit; a wrong end is rejected; the run length is the law's."""
    lr = 1e-2
    ends = lesson.lb_galore_ends(problem, 1, lr, seeds=[0])
    lesson.check_lb_galore_law(problem, 1, lr, ends)
    with pytest.raises(AssertionError):
        lesson.check_lb_galore_law(problem, 1, lr, ends + 1e-6)
    needed = int(th.lb_galore_shrinks(problem, 1.0, lr, 10).sum())
    assert lesson.refreshes_needed(problem, 1, lr, 10) == needed  # probability 1: no margin needed
    assert lesson.refreshes_needed(problem, 3, lr, 10) > int(th.lb_galore_shrinks(problem, 1 / 3, lr, 10).sum())
    even = lesson.lb_galore_ends(problem, 2, lr, seeds=[0])
    lesson.check_lb_galore_law(problem, 2, lr, even)
    with pytest.raises(AssertionError):
        lesson.check_lb_galore_law(problem, 2, lr, even + 1e-3)


def test_pictures_draw(problem):
    frame = lesson.trace(problem, ["galore", "golore@100"], steps=200, log_every=10)
    fig = lesson.plot_picture(frame, problem)
    assert len(fig.axes) == 3
    galore_lines = fig.axes[1].get_lines()
    assert len(galore_lines) == problem.n - problem.r + 1  # six singular values and the σ line
    np.testing.assert_allclose(galore_lines[0].get_ydata(), frame[(frame.method == "galore") & (frame.step > 0)].s1)
