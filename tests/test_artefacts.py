"""The artefact layer: one protocol per module, caches that carry their integrity, clean regeneration."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from golore_lab import artefacts, figures
from golore_lab.artefacts import cache

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "figures" / "data" / "runs"
#: re-plotted from the committed caches in seconds (no LM stack, no data)
CHEAP = ("fig1_counterexample", "fig2_snr_sweep", "table2_finetune", "fig5_rates_stochastic", "fig5_rate_deterministic")


@pytest.mark.parametrize("name", artefacts.ARTEFACTS)
def test_every_artefact_follows_the_protocol(name):
    module = artefacts.get(name)
    assert module.NAME == name and set(module.PRESETS) == set(artefacts.PRESET_NAMES)
    for preset, config in module.PRESETS.items():
        assert dataclasses.is_dataclass(config) and config.preset == preset
        with pytest.raises(dataclasses.FrozenInstanceError):
            config.preset = "x"
        assert module.expected_groups(config) and all(len(g) == len(module.GROUP_BY)
                                                       for g in module.expected_groups(config))
    keys = {cache.cache_key(name, c) for c in module.PRESETS.values() if c != module.PRESETS["default"]}
    assert cache.cache_key(name, module.PRESETS["default"]) not in keys  # a preset never shares a cache
    assert callable(module.run) and callable(module.plot)


def test_cache_key_is_a_pure_function_of_name_and_config():
    module = artefacts.get("fig2_snr_sweep")
    config = module.PRESETS["default"]
    assert cache.cache_key(module.NAME, config) == cache.cache_key(module.NAME, dataclasses.replace(config))
    assert cache.cache_key(module.NAME, config) != cache.cache_key(module.NAME, dataclasses.replace(config, seed=1))
    assert cache.cache_key(module.NAME, config) != cache.cache_key("fig2_other", config)


@pytest.mark.parametrize("preset", ["fast", "default"])
@pytest.mark.parametrize("name", artefacts.ARTEFACTS)
def test_committed_caches_validate(name, preset):
    """Every artefact the notebooks (fast) and ``make figures`` (default) need is committed and intact."""
    frame = artefacts.load_cached(name, artefacts.get(name).PRESETS[preset], RUNS)
    assert len(frame) > 0


# ------------------------------------------------------------------ damaged caches
def _copy(tmp_path: Path, name: str, preset: str = "default") -> tuple[Path, Path, Path]:
    """A copy of the committed cache of ``name`` under tmp/figures/data/runs; returns (figures, csv, manifest)."""
    config = artefacts.get(name).PRESETS[preset]
    runs = tmp_path / "figures" / "data" / "runs"
    runs.mkdir(parents=True)
    for path in cache.cache_paths(RUNS, name, config):
        shutil.copy(path, runs / path.name)
    csv, manifest = cache.cache_paths(runs, name, config)
    return tmp_path / "figures", csv, manifest


def _cut_mid_line(data: bytes) -> bytes:
    return data[: len(data) // 2 + 7]


def _cut_at_line(data: bytes) -> bytes:
    lines = data.splitlines(keepends=True)
    return b"".join(lines[:-min(20, len(lines) // 3)])


def _delete_rows(data: bytes) -> bytes:
    lines = data.splitlines(keepends=True)
    return b"".join(lines[:5] + lines[10:])


def _rehash(manifest: Path, data: bytes) -> None:
    """Make the manifest's sha256 agree with damaged data (the row counts must still catch it)."""
    record = json.loads(manifest.read_text())
    record["sha256"] = hashlib.sha256(data).hexdigest()
    manifest.write_text(json.dumps(record))


@pytest.mark.parametrize("damage", [_cut_mid_line, _cut_at_line, _delete_rows])
@pytest.mark.parametrize("name", ["fig3_pretrain", "table2_finetune", "fig4_finetune"])
@pytest.mark.parametrize("rehash", [False, True], ids=["hash", "counts"])
def test_damaged_llm_caches_are_refused_by_name(tmp_path, name, damage, rehash):
    out, csv, manifest = _copy(tmp_path, name)
    damaged = damage(csv.read_bytes())
    csv.write_bytes(damaged)
    if rehash:
        if damage is _cut_mid_line:
            pytest.skip("a line cut mid-way still parses; the row counts are checked by the other two cuts")
        _rehash(manifest, damaged)
    config = artefacts.get(name).PRESETS["default"]
    with pytest.raises(artefacts.CacheError) as error:
        artefacts.load_cached(name, config, csv.parent)
    assert error.value.path.name == csv.name
    assert ("sha256 mismatch" if not rehash else "incomplete") in error.value.reason


def test_a_hash_mismatch_of_the_same_length_is_detected(tmp_path):
    out, csv, manifest = _copy(tmp_path, "fig3_pretrain")
    data = bytearray(csv.read_bytes())
    data[-10] = ord("7") if data[-10] != ord("7") else ord("8")  # one digit of one number
    csv.write_bytes(bytes(data))
    with pytest.raises(artefacts.CacheError, match="sha256 mismatch"):
        artefacts.load_cached("fig3_pretrain", artefacts.get("fig3_pretrain").PRESETS["default"], csv.parent)


def test_a_manifest_of_another_configuration_is_refused(tmp_path):
    out, csv, manifest = _copy(tmp_path, "fig2_snr_sweep")
    record = json.loads(manifest.read_text())
    record["config"]["trials"] = 7
    manifest.write_text(json.dumps(record))
    with pytest.raises(artefacts.CacheError, match="another artefact, configuration"):
        artefacts.load_cached("fig2_snr_sweep", artefacts.get("fig2_snr_sweep").PRESETS["default"], csv.parent)


def test_an_incomplete_result_is_never_cached(tmp_path):
    module = artefacts.get("fig4_finetune")
    config = module.PRESETS["default"]
    frame = artefacts.load_cached(module, config, RUNS)
    with pytest.raises(ValueError, match=r"incomplete result, not cached \(missing groups \['golore@20'\]"):
        cache.store(tmp_path, module.NAME, config, frame[frame.method != "golore@20"], module.GROUP_BY,
                    module.expected_groups(config))
    assert not list(tmp_path.iterdir())


def test_figures_write_nothing_when_any_input_fails(tmp_path, capsys):
    """--no-recompute with one damaged cache: exit 1, the damaged file named, and no PNG or table rewritten,
    not even those of the artefacts whose caches are intact."""
    out, csv, manifest = _copy(tmp_path, "fig3_pretrain")
    for name in ("fig2_snr_sweep", "table2_finetune"):
        config = artefacts.get(name).PRESETS["default"]
        for path in cache.cache_paths(RUNS, name, config):
            shutil.copy(path, csv.parent / path.name)
    before = {}
    for name in ("fig2_snr_sweep.png", "table2_finetune.png", "table2_finetune.md", "fig3_pretrain.png",
                 "fig3_pretrain.md"):
        (out / name).write_bytes(b"old " + name.encode())
        before[name] = (out / name).read_bytes()
    csv.write_bytes(_cut_at_line(csv.read_bytes()))
    code = figures.main(["--only", "fig2_snr_sweep", "table2_finetune", "fig3_pretrain", "--no-recompute",
                         "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and csv.name in err and "sha256 mismatch" in err and "fig3_pretrain" in err
    assert {name: (out / name).read_bytes() for name in before} == before
    assert figures.main(["--only", "fig2_snr_sweep", "table2_finetune", "--no-recompute", "--out", str(out)]) == 0
    assert (out / "table2_finetune.md").read_bytes() == (ROOT / "figures" / "table2_finetune.md").read_bytes()


def test_a_damaged_cache_is_recomputed_and_reported(tmp_path, capsys):
    out, csv, manifest = _copy(tmp_path, "fig5_rate_deterministic", "fast")
    csv.write_bytes(_cut_mid_line(csv.read_bytes()))
    frame = artefacts.result("fig5_rate_deterministic", "fast", root=csv.parent)
    said = capsys.readouterr().out
    assert csv.name in said and "sha256 mismatch" in said and said.rstrip().endswith("recomputing")
    assert len(frame) == artefacts.get("fig5_rate_deterministic").PRESETS["fast"].steps
    artefacts.load_cached("fig5_rate_deterministic", artefacts.get("fig5_rate_deterministic").PRESETS["fast"],
                          csv.parent)  # the recomputed cache validates


# ------------------------------------------------------------------ clean regeneration
def test_the_setup_installs_the_matplotlib_that_rendered_the_figures():
    from golore_lab.plotting import RENDERED_WITH

    assert f"MATPLOTLIB ?= matplotlib=={RENDERED_WITH}\n" in (ROOT / "Makefile").read_text()


#: RMS tolerance (0-255 colour levels, matplotlib.testing.compare) for a re-rendered figure: across CPUs Agg's
#: anti-aliasing moves a handful of pixels by a level or two (RMS well under 0.1 on these ~10^5-pixel images),
#: (two pixels one level off: RMS 0.0013), while a curve drawn from numbers 1% off moves hundreds of pixels by up
#: to 255 levels (RMS 4.1 on fig5_rate_deterministic; see test_the_tolerance_tells_other_numbers_apart)
RMS_TOLERANCE = 0.5


def _same_picture(expected: Path, actual: Path) -> str | None:
    """None when the two PNGs agree within :data:`RMS_TOLERANCE`, else compare_images' message."""
    from matplotlib.testing.compare import compare_images

    try:
        return compare_images(str(expected), str(actual), tol=RMS_TOLERANCE)
    except Exception as error:  # ImageComparisonFailure: the images' sizes differ
        return str(error)


def _requires_the_pinned_matplotlib():
    import matplotlib

    from golore_lab.plotting import RENDERED_WITH

    if matplotlib.__version__ != RENDERED_WITH:
        pytest.skip(f"the committed PNGs were rendered by matplotlib {RENDERED_WITH}, this is {matplotlib.__version__}")


def test_cheap_figures_redraw_to_the_committed_pictures(tmp_path):
    """Re-drawn from the committed caches, the cheap figures match the committed PNGs within the tolerance (not
    byte for byte: another CPU may anti-alias a few pixels differently), and the tables byte for byte."""
    _requires_the_pinned_matplotlib()
    out = tmp_path / "figures"
    shutil.copytree(RUNS, out / "data" / "runs")
    assert figures.main(["--only", *CHEAP, "--no-recompute", "--redraw", "--out", str(out)]) == 0
    for name in CHEAP:
        assert _same_picture(ROOT / "figures" / f"{name}.png", out / f"{name}.png") is None, name
        assert (out / f"{name}.stamp.json").exists()
    assert (out / "table2_finetune.md").read_bytes() == (ROOT / "figures" / "table2_finetune.md").read_bytes()
    assert sorted(p.name for p in (out / "data" / "runs").iterdir()) == sorted(p.name for p in RUNS.iterdir())


def test_the_tolerance_tells_other_numbers_apart(tmp_path):
    """The same figure drawn from numbers 1% off on one curve is outside the tolerance: the comparison is not
    blind."""
    _requires_the_pinned_matplotlib()
    from golore_lab.plotting import png_bytes

    module = artefacts.get("fig5_rate_deterministic")
    frame = artefacts.load_cached(module, module.PRESETS["default"], RUNS)
    column = [c for c in frame.columns if frame[c].dtype.kind == "f"][0]
    changed = frame.copy()
    changed[column] = changed[column] * 1.01
    (tmp_path / "changed.png").write_bytes(png_bytes(module.plot(changed)))
    assert _same_picture(ROOT / "figures" / "fig5_rate_deterministic.png", tmp_path / "changed.png") is not None


def _copy_figures(tmp_path: Path, names) -> Path:
    out = tmp_path / "figures"
    shutil.copytree(RUNS, out / "data" / "runs")
    for name in names:
        for suffix in (".png", ".stamp.json"):
            shutil.copy(ROOT / "figures" / f"{name}{suffix}", out / f"{name}{suffix}")
    return out


def test_unchanged_inputs_never_rewrite_a_png(tmp_path, monkeypatch, capsys):
    """A renderer that draws other bytes (as Agg may on another CPU) cannot dirty the tree: with data, plotting
    code and matplotlib as stamped, the PNGs are not even rewritten."""
    from golore_lab import plotting

    out = _copy_figures(tmp_path, CHEAP)
    before = {name: ((out / f"{name}.png").read_bytes(), (out / f"{name}.png").stat().st_mtime_ns) for name in CHEAP}
    real = plotting.png_bytes
    monkeypatch.setattr(plotting, "png_bytes", lambda fig: real(fig) + b"another CPU")
    assert figures.main(["--only", *CHEAP, "--no-recompute", "--out", str(out)]) == 0
    after = {name: ((out / f"{name}.png").read_bytes(), (out / f"{name}.png").stat().st_mtime_ns) for name in CHEAP}
    assert after == before
    assert capsys.readouterr().err.count("unchanged (data, plotting code and matplotlib as stamped)") == len(CHEAP)


@pytest.mark.parametrize("change", ["data_sha256", "code_sha256", "matplotlib", "png"])
def test_changed_inputs_redraw_the_figure(tmp_path, change):
    from golore_lab.artefacts import stamp

    name = "fig5_rate_deterministic"
    out = _copy_figures(tmp_path, [name])
    png, stamp_file = out / f"{name}.png", out / f"{name}.stamp.json"
    if change == "png":
        png.write_bytes(b"edited by hand")
    else:
        record = json.loads(stamp_file.read_text())
        record[change] = "something else"
        stamp_file.write_text(json.dumps(record))
    assert figures.main(["--only", name, "--no-recompute", "--out", str(out)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    module = artefacts.get(name)
    csv, _ = cache.cache_paths(out / "data" / "runs", name, module.PRESETS["default"])
    assert stamp.is_current(png, stamp.expected_stamp(module, csv))   # the stamp was rewritten with the PNG


@pytest.mark.parametrize("name", artefacts.ARTEFACTS)
def test_every_committed_figure_has_a_current_stamp(name):
    """``make figures`` on a fresh clone rewrites no tracked PNG: every figure's stamp matches its committed cache,
    its plotting code, the pinned matplotlib and the PNG's own bytes. Fails after a change of plotting code until
    ``make figures`` is run and the new PNGs and stamps are committed."""
    from golore_lab.artefacts import stamp

    module = artefacts.get(name)
    csv, _ = cache.cache_paths(RUNS, name, module.PRESETS["default"])
    expected = stamp.expected_stamp(module, csv)
    png = ROOT / "figures" / f"{name}.png"
    assert stamp.read_stamp(png) is not None, f"no stamp beside {png.name}: run make figures and commit it"
    assert stamp.is_current(png, expected), {k: (stamp.read_stamp(png).get(k), v) for k, v in expected.items()
                                             if stamp.read_stamp(png).get(k) != v}


def test_the_stamp_covers_the_plotting_helpers():
    from golore_lab.artefacts import stamp

    files = stamp.expected_stamp(artefacts.get("fig2_isotropic"), next(RUNS.glob("fig2_isotropic-default-*.csv")))
    assert {"golore_lab/plotting.py", "golore_lab/artefacts/fig2_isotropic.py", "golore_lab/artefacts/fig2_captured.py",
            "golore_lab/artefacts/fig1_counterexample.py"} <= set(files["code_files"])
    files = stamp.expected_stamp(artefacts.get("fig5_rate_deterministic"),
                                 next(RUNS.glob("fig5_rate_deterministic-default-*.csv")))
    assert "golore_lab/artefacts/_fig5_plots.py" in files["code_files"]


def test_a_fast_preset_never_overwrites_the_default_figures(tmp_path):
    out = tmp_path / "figures"
    shutil.copytree(RUNS, out / "data" / "runs")
    assert figures.main(["--only", "fig2_snr_sweep", "--preset", "fast", "--no-recompute", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["fig2_snr_sweep-fast.png"]


def test_data_are_written_with_six_significant_digits():
    frame = pd.DataFrame({"x": [1 / 3, 123456.789, 1e-9 / 7], "n": [1, 2, 3]})
    assert cache.csv_bytes(frame) == b"x,n\n0.333333,1\n123457,2\n1.42857e-10,3\n"


# ------------------------------------------------------------------ run and plot, small
SMALL = {
    "fig5_stiefel_mean": dict(mc_sizes=(8, 16, 32), replicates=2, bias_samples=16),
    "fig5_perturbation_bound": dict(trials=2),
    "fig5_rates_stochastic": dict(lrs=(0.1, 0.2), sweep_batches=(2, 3), seeds=1, horizon=20.0),
    "fig5_rate_deterministic": dict(steps=300),
    "fig2_snr_sweep": dict(trials=5, points=4),
}


@pytest.mark.parametrize("name", SMALL)
def test_small_runs_cache_and_plot(tmp_path, name):
    """run -> store -> load -> plot at a tiny configuration; the plot is a Figure and the cache validates."""
    import matplotlib.figure

    module = artefacts.get(name)
    config = dataclasses.replace(module.PRESETS["fast"], **SMALL[name])
    frame = artefacts.compute(module, config, tmp_path)
    assert len(frame) and isinstance(module.plot(frame), matplotlib.figure.Figure)
    assert [p.suffix for p in sorted(tmp_path.iterdir())] == [".csv", ".json"]


# ------------------------------------------------------------------ damaged manifests and data files
@pytest.mark.parametrize("damage, reason", [
    (lambda r: {k: v for k, v in r.items() if k != "sha256"}, "incomplete manifest: no sha256"),
    (lambda r: {k: v for k, v in r.items() if k != "rows_per_group"}, "incomplete manifest: no rows_per_group"),
    (lambda r: [r], "not a manifest (a JSON list, not an object)"),
])
def test_a_manifest_without_its_fields_is_refused_and_recomputed(tmp_path, capsys, damage, reason):
    name = "fig5_rate_deterministic"
    out, csv, manifest = _copy(tmp_path, name, "fast")
    manifest.write_text(json.dumps(damage(json.loads(manifest.read_text()))))
    config = artefacts.get(name).PRESETS["fast"]
    with pytest.raises(artefacts.CacheError) as error:
        artefacts.load_cached(name, config, csv.parent)
    assert error.value.path == manifest and error.value.reason == reason
    frame = artefacts.result(name, "fast", root=csv.parent)     # the default mode recomputes
    assert reason in capsys.readouterr().out and len(frame) == config.steps
    artefacts.load_cached(name, config, csv.parent)


def test_a_data_file_that_is_a_directory_is_named(tmp_path, capsys):
    name = "fig5_rate_deterministic"
    out, csv, manifest = _copy(tmp_path, name)
    csv.unlink()
    csv.mkdir()
    with pytest.raises(artefacts.CacheError, match="unreadable data file"):
        artefacts.load_cached(name, artefacts.get(name).PRESETS["default"], csv.parent)
    before = (ROOT / "figures" / f"{name}.png").read_bytes()
    (out / f"{name}.png").write_bytes(before)
    assert figures.main(["--only", name, "--out", str(out)]) == 1      # recomputed, but cannot be cached there
    err = capsys.readouterr().err
    assert f"{name}: not cached: {csv}: a directory where the cache file belongs; nothing was written" in err
    assert csv.is_dir() and (out / f"{name}.png").read_bytes() == before
