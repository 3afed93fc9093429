"""Figure 7 (batch size at a fixed token budget): the schedule's scaling, the lr-grid search that extends past an
edge, the scheduler's decisions, the analysis and table against hand computations, and the fast preset end to
end. The committed default result is checked against Figure 3 where the two ran the same runs."""
from __future__ import annotations

import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from golore_lab import artefacts
from golore_lab.artefacts import fig3_pretrain as fig3
from golore_lab.artefacts import fig7_batch_size as fig7

RUNS = Path(__file__).resolve().parents[1] / "figures" / "data" / "runs"
DEFAULT = fig7.PRESETS["default"]


# ------------------------------------------------------------------ schedule
def test_same_tokens_same_fractions_at_every_batch():
    rows = {b: fig7.schedule(DEFAULT, b) for b in DEFAULT.batches}
    assert [rows[b]["steps"] for b in (8, 32, 128)] == [160, 40, 10]
    assert [rows[b]["warmup_steps"] for b in (8, 32, 128)] == [16, 4, 1]
    assert [rows[b]["update_proj_gap"] for b in (8, 32, 128)] == [16, 4, 1]
    assert [rows[b]["eval_every"] for b in (8, 32, 128)] == [16, 4, 1]
    for b, r in rows.items():
        assert r["steps"] * b == 1280                              # same sequences, hence tokens
        assert r["warmup_steps"] / r["steps"] == pytest.approx(0.1)
        assert r["steps"] // r["update_proj_gap"] == 10            # ten refreshes
        cfg = fig7.train_config(DEFAULT, b, "golore@20", 1e-3, 0)
        assert (cfg.batch_size, cfg.steps, cfg.warmup_steps, cfg.update_proj_gap) == \
            (b, r["steps"], r["warmup_steps"], r["update_proj_gap"])
        assert cfg.switch_step == 0.8 * r["steps"] and cfg.switch_step % cfg.update_proj_gap == 0  # at a refresh
    # the evaluations are at the same token positions: 0, 128, ..., 1280 sequences
    positions = {b: [k * r["eval_every"] * b for k in range(r["steps"] // r["eval_every"] + 1)]
                 for b, r in rows.items()}
    assert positions[8] == positions[32] == positions[128] == list(range(0, 1281, 128))


def test_a_schedule_that_is_not_whole_is_refused():
    with pytest.raises(ValueError, match="Invalid steps"):
        fig7.schedule(DEFAULT, 3)
    with pytest.raises(ValueError, match="Invalid update_proj_gap"):
        fig7.schedule(replace(DEFAULT, refreshes=3), 8)
    with pytest.raises(ValueError, match="Invalid warmup_steps"):
        fig7.schedule(DEFAULT, 256)  # 5 steps: 10% is half a step


def test_batch_8_is_figure_3s_recipe():
    """At batch 8 every run of the default preset is Figure 3's AdamW run of that method and seed (only the lr
    is tuned); the final seeds are Figure 3's."""
    assert DEFAULT.seeds == fig3.PRESETS["default"].seeds and DEFAULT.tune_seed not in DEFAULT.seeds
    f3 = fig3.PRESETS["default"]
    assert DEFAULT.eval_windows == f3.eval_windows and DEFAULT.model == f3.model and f3.seq_len is DEFAULT.seq_len
    runs = [c for c in fig3.train_configs(f3) if c.optimizer == "adamw" and c.method in fig7.METHODS]
    assert len(runs) == 9
    for c in runs:
        assert fig7.train_config(DEFAULT, 8, c.method, c.lr, c.seed) == c
        assert fig7.train_config(DEFAULT, 8, c.method, 1e-2, c.seed) == replace(c, lr=1e-2)


# ------------------------------------------------------------------ lr grid
def test_the_ladder():
    assert [fig7.ladder_step(x, +1) for x in (3e-4, 1e-3, 3e-3, 1e-2)] == [1e-3, 3e-3, 1e-2, 3e-2]
    assert [fig7.ladder_step(x, -1) for x in (1e-3, 3e-3, 1e-1)] == [3e-4, 1e-3, 3e-2]
    with pytest.raises(ValueError, match="Invalid lr: 0.002"):
        fig7.ladder_step(2e-3, 1)


def _bowl(best: float):
    """A fake run: final loss a parabola in log10(lr) with its minimum at ``best``; records its calls."""
    calls = []

    def run_one(lr):
        calls.append(lr)
        return 4.0 + (math.log10(lr) - math.log10(best)) ** 2
    return run_one, calls


@pytest.mark.parametrize("best, grid", [
    (3e-2, [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]),            # best above the grid: two points added above
    (1e-1, [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]),       # three
    (3e-4, [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]),             # below: two points added below
    (3e-3, [1e-3, 3e-3, 1e-2]),                          # inside from the start: nothing added
])
def test_the_grid_is_extended_until_the_best_is_inside(best, grid):
    run_one, calls = _bowl(best)
    losses = fig7.search(run_one, (1e-3, 3e-3, 1e-2), max_extensions=4)
    assert sorted(losses) == pytest.approx(grid) and len(calls) == len(grid) == len(set(calls))
    chosen = fig7.best_lr(losses)
    assert chosen == pytest.approx(best) and min(losses) < chosen < max(losses)


def test_a_diverged_point_ends_the_extension_and_is_never_chosen():
    run_one, _ = _bowl(1.0)  # would go on climbing ...
    losses = fig7.search(lambda lr: math.inf if lr >= 3e-2 else run_one(lr), (1e-3, 3e-3, 1e-2), 4)
    assert sorted(losses) == [1e-3, 3e-3, 1e-2, 3e-2] and fig7.best_lr(losses) == 1e-2


def test_extensions_stop_when_spent_and_the_best_stays_at_the_edge():
    losses = fig7.search(lambda lr: -lr, (1e-3, 3e-3), max_extensions=2)
    assert sorted(losses) == [1e-3, 3e-3, 1e-2, 3e-2] and fig7.best_lr(losses) == 3e-2
    assert fig7.next_lr(losses, (1e-3, 3e-3), 2) is None
    assert fig7.next_lr(losses, (1e-3, 3e-3), 3) == pytest.approx(1e-1)
    assert fig7.next_lr({}, (1e-3, 3e-3), 0) == 1e-3  # the starting grid is always run
    assert fig7.best_lr({1e-3: math.inf, 1e-2: math.inf}) == 1e-3  # all diverged: go down


# ------------------------------------------------------------------ the scheduler, with fake runs in threads
SMALL = replace(fig7.PRESETS["fast"], batches=(4, 16), methods=("full", "galore"), seeds=(1, 2), max_extensions=3)
OPTIMUM = {(4, "full"): 1e-3, (4, "galore"): 3e-3, (16, "full"): 1e-1, (16, "galore"): 1e-2}


def _fake_loss(batch, method, lr, seed):
    return 5.0 + (math.log10(lr) - math.log10(OPTIMUM[(batch, method)])) ** 2 + 0.01 * seed + 0.1 * (method == "full")


def _fake_train(config, part, batch, method, lr, seed):
    steps = fig7.schedule(config, batch)["steps"]
    every = fig7.schedule(config, batch)["eval_every"]
    step = np.arange(0, steps + 1, every)
    loss = _fake_loss(batch, method, lr, seed) + (steps - step) / steps
    return pd.DataFrame({"step": step, "tokens": step * batch * 64, "val_loss": loss, "val_ppl": np.exp(loss),
                         "row": "curve", "part": part, "batch": batch, "method": method, "seed": seed, "lr": lr,
                         "run_steps": steps, "run_seconds": 0.0})


def _fake_kappa(config, batch, lr):
    steps = fig7.schedule(config, batch)["steps"]
    rows = [dict(step=s, layer=f"l{i}", dim=32, rank=8, svd=0.5 + 0.1 * i + s / (10 * steps) + batch / 100,
                 random=0.25, oracle=0.99, snr=1.0) for s in (0, steps // 2, steps) for i in range(2)]
    return pd.DataFrame(rows).assign(row="kappa", part="kappa", batch=batch, method="full", seed=config.tune_seed,
                                     lr=lr, run_steps=steps, run_seconds=0.0)


@pytest.fixture(scope="module")
def fake_frame():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fig7, "_train_job", _fake_train)
        patch.setattr(fig7, "_kappa_job", _fake_kappa)
        return fig7.run(SMALL, executor=ThreadPoolExecutor(max_workers=3), log=lambda *_: None)


def test_the_parallel_search_makes_the_sequential_searchs_decisions(fake_frame):
    tune = fig7.tuning(fake_frame).set_index(["batch", "method"])
    for (b, m), best in OPTIMUM.items():
        expected = fig7.search(lambda lr: _fake_loss(b, m, lr, SMALL.tune_seed), SMALL.lrs, SMALL.max_extensions)
        assert tune.loc[(b, m), "grid"] == sorted(expected)
        assert tune.loc[(b, m), "lr"] == pytest.approx(fig7.best_lr(expected))
    assert tune.loc[(4, "full"), "grid"] == pytest.approx([3e-4, 1e-3, 3e-3, 1e-2])  # extended down
    assert tune.loc[(16, "full"), "grid"] == pytest.approx([3e-3, 1e-2, 3e-2, 1e-1, 3e-1])  # up, three times
    assert tune.inside.all()
    # final runs at the tuned lr, every seed; κ at full's tuned lr; a complete, cacheable result
    finals = fig7.final_losses(fake_frame)
    for r in finals.itertuples():
        assert r.lr == pytest.approx(OPTIMUM[(r.batch, r.method)])
    assert len(finals) == 2 * 2 * 2
    kappa = fake_frame[fake_frame.row == "kappa"]
    assert dict(kappa.groupby("batch").lr.first()) == pytest.approx({4: 1e-3, 16: 1e-1})
    counts = fake_frame.groupby(list(fig7.GROUP_BY)).size()
    assert set(counts.index) == set(fig7.expected_groups(SMALL))


def test_the_row_order_does_not_depend_on_which_run_ends_first(fake_frame):
    shuffled = fake_frame.sample(frac=1.0, random_state=0)
    # each run's own rows in the order the run wrote them (by step, then layer); the runs in any order
    shuffled = shuffled.sort_values(["step", "layer"], kind="stable", na_position="first").reset_index(drop=True)
    pd.testing.assert_frame_equal(fig7._ordered(shuffled, SMALL), fake_frame)


# ------------------------------------------------------------------ analysis and table, recomputed by hand
def _cells(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|") and not line.startswith("|---")][1:]


def test_the_table_is_the_frame_recomputed(fake_frame):
    from scipy import stats

    text = fig7.table(fake_frame)
    rows = _cells(text.split("\n\n")[0])
    assert len(rows) == 4
    last = fake_frame[(fake_frame.part == "final") & (fake_frame.step == fake_frame.run_steps)]
    for row in rows:
        batch, method = int(row[0]), {"Full": "full", "GaLore": "galore"}[row[2]]
        d = last[(last.batch == batch) & (last.method == method)].sort_values("seed")
        assert int(row[1]) == fig7.schedule(SMALL, batch)["steps"]
        assert float(row[4]) == pytest.approx(OPTIMUM[(batch, method)])
        mean, std = (float(x) for x in row[5].split(" ± "))
        assert mean == pytest.approx(d.val_loss.mean(), abs=1e-4) and std == pytest.approx(d.val_loss.std(), abs=1e-4)
        if method == "full":
            g = last[(last.batch == batch) & (last.method == "galore")].sort_values("seed")
            diff = d.val_loss.to_numpy() - g.val_loss.to_numpy()
            half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / math.sqrt(len(diff))
            m, lo, hi = (float(x) for x in re.findall(r"[+-]\d+\.\d+", row[7]))
            assert (m, lo, hi) == pytest.approx((diff.mean(), diff.mean() - half, diff.mean() + half), abs=1e-4)
        else:
            assert row[7] == ""
        k = fake_frame[(fake_frame.row == "kappa") & (fake_frame.batch == batch)]
        assert float(row[9]) == pytest.approx(k.svd.mean(), abs=1e-3)
    krows = _cells(text.split("\n\n")[-1])
    for row in krows:
        k = fake_frame[(fake_frame.row == "kappa") & (fake_frame.batch == int(row[0]))]
        per_step = k.groupby("step").svd.mean()
        assert [float(x) for x in row[1:5]] == pytest.approx(
            [per_step.iloc[0], per_step.iloc[1], per_step.iloc[2], per_step.mean()], abs=1e-3)
        assert float(row[5]) == 0.25


def test_an_lr_at_an_edge_is_marked_in_the_table(fake_frame):
    # drop the point above the tuned lr of batch 16 / full: its best is then at the top of the grid run
    frame = fake_frame[~((fake_frame.part == "tune") & (fake_frame.batch == 16) & (fake_frame.method == "full")
                         & np.isclose(fake_frame.lr, 3e-1))]
    tune = fig7.tuning(frame).set_index(["batch", "method"])
    assert not tune.loc[(16, "full"), "inside"] and tune.drop(index=(16, "full")).inside.all()
    assert "| 16 | 10 | Full | 0.003, 0.01, 0.03, 0.1 | 0.1 (edge) |" in fig7.table(frame)


def test_the_plot_titles_follow_the_numbers(fake_frame):
    fig = fig7.plot(fake_frame)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[1] == "Full − GaLore: B=4: > 0, B=16: > 0"  # full is 0.1 worse at every seed here
    frame = fake_frame.copy()
    full = (frame.part == "final") & (frame.method == "full") & (frame.batch == 16)
    frame.loc[full, "val_loss"] -= 1.0 + 0.01 * frame.loc[full, "seed"]  # now better, by different amounts
    assert fig7.plot(frame).axes[1].get_title() == "Full − GaLore: B=4: > 0, B=16: < 0"
    assert "4: " in titles[2] and "16: " in titles[2]


# ------------------------------------------------------------------ the real runs
def test_the_fast_preset_runs_end_to_end(tmp_path, monkeypatch):
    """Real training in spawned workers: the tiny model on the fixture corpus (nothing is fetched)."""
    import matplotlib.figure
    from lm_helpers import build_fixture_corpus

    from golore_lab.lm.data import DEFAULT_VOCAB

    cache = tmp_path / "cache"
    build_fixture_corpus(cache, DEFAULT_VOCAB)
    monkeypatch.setenv("GOLORE_LAB_CACHE", str(cache))
    config = fig7.PRESETS["fast"]
    frame = artefacts.compute(fig7, config, tmp_path / "runs")
    assert set(frame.groupby(list(fig7.GROUP_BY)).size().index) == set(fig7.expected_groups(config))
    tune = fig7.tuning(frame)
    assert len(tune) == len(config.batches) * len(config.methods)
    for r in tune.itertuples():  # the two-point grid always extends at least once
        assert r.points >= 3 and set(config.lrs) <= set(r.grid)
        assert r.inside or r.points == len(config.lrs) + config.max_extensions
    finals = fig7.final_losses(frame)
    assert np.isfinite(finals.val_loss).all() and (finals.val_loss < math.log(frame_vocab(cache))).all()
    for r in finals.itertuples():
        assert r.lr == fig7.tuned_lrs(frame)[(r.batch, r.method)]
    curve = frame[(frame.row == "curve")].groupby(["part", "batch", "method", "seed", "lr"]).filter(
        lambda d: np.isfinite(d.val_loss).all())  # a diverged run has one row (inf)
    assert set(curve.groupby(["part", "batch", "method", "seed", "lr"]).size()) == {config.evals + 1}
    kappa = frame[frame.row == "kappa"]
    for b in config.batches:
        steps = fig7.schedule(config, b)["steps"]
        assert sorted(kappa[kappa.batch == b].step.unique()) == [0, steps // 2, steps]
    assert ((kappa.svd > 0) & (kappa.svd <= kappa.oracle + 1e-9)).all()
    assert isinstance(fig7.plot(frame), matplotlib.figure.Figure) and "| batch |" in fig7.table(frame)


def frame_vocab(cache: Path) -> int:
    from golore_lab.lm.data import DEFAULT_VOCAB, corpus_dir, load_corpus

    return load_corpus(corpus_dir(cache, DEFAULT_VOCAB)).vocab_size


@pytest.fixture(scope="module")
def committed():
    return artefacts.load_cached(fig7, DEFAULT, RUNS)


def test_the_committed_result_is_complete_and_tuned_inside_its_grids(committed):
    tune = fig7.tuning(committed)
    assert len(tune) == 9 and tune.inside.all(), tune
    assert set(fig7.final_losses(committed).groupby(["batch", "method"]).seed.nunique()) == {3}
    kappa = fig7.kappa_by_batch(committed)
    assert list(kappa.batch) == [8, 32, 128] and (kappa.r_over_dim == 0.25).all()


def test_the_committed_batch_8_runs_are_figure_3s_where_the_lr_is(committed):
    """Where batch 8's tuned lr is Figure 3's (3e-3), its final runs are Figure 3's runs: the same numbers."""
    f3 = artefacts.load_cached(fig3, fig3.PRESETS["default"], RUNS)
    f3 = f3[(f3.optimizer == "adamw") & f3.val_ppl.notna()]
    lr3 = float(fig3.train_configs(fig3.PRESETS["default"])[0].lr)
    compared = 0
    for (b, m), lr in fig7.tuned_lrs(committed).items():
        if b != 8 or lr != lr3:
            continue
        for s in DEFAULT.seeds:
            ours = committed[(committed.part == "final") & (committed.batch == 8) & (committed.method == m)
                             & (committed.seed == s)].set_index("step").val_loss
            theirs = f3[(f3.method == m) & (f3.seed == s)].set_index("step").val_loss
            assert list(ours.index) == list(theirs.index)
            np.testing.assert_allclose(ours.to_numpy(), theirs.to_numpy(), rtol=2e-3)
            compared += 1
    tuned8 = {m: lr for (b, m), lr in fig7.tuned_lrs(committed).items() if b == 8}
    assert compared == 3 * sum(lr == lr3 for lr in tuned8.values())
