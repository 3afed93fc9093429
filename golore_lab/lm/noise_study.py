"""Does the noise-dominated regime occur in language-model training? The real-model part of Figure 2.

Pre-train the CPU LLaMA with full AdamW (the scaled-down paper recipe of :mod:`golore_lab.lm.pretrain`) and,
every ``every`` steps, for each attention and MLP weight W measure how much of its *true* gradient G each
rank-r subspace captures (:func:`golore_lab.analysis.layer_capture`):

* G: the gradient of a fixed reference set of ``reference_windows`` training windows (independent of the
  training stream; the stand-in for the population gradient);
* ``svd``: top-r SVD of one optimizer batch's gradient (what GaLore uses);
* ``svd_large``: top-r SVD of a ``large_factor`` times larger batch (what L.B. GaLore uses);
* ``random``: a Haar-random basis (GoLore; r/dim in expectation);
* ``oracle``: top-r SVD of G itself (the best any rank-r subspace can do);
* ``snr``: ‖G‖₂ / ‖Ĝ₁ − G‖₂, the layer's gradient-to-noise ratio.
"""
from __future__ import annotations

import pandas as pd
import torch

from ..analysis import layer_capture
from .model import LlamaConfig, is_subspace_weight
from .pretrain import LMTask, recipe
from .train import lr_factor


def run_study(model: str = "cpu", steps: int = 160, every: int = 20, batch_size: int = 8, large_factor: int = 8,
              reference_windows: int = 256, chunk: int = 32, rank: int | None = None, seed: int = 0,
              corpus=None, log=print, **overrides) -> pd.DataFrame:
    """Train and measure; returns one row per (step, layer) with the columns of ``layer_capture`` + ``val_loss``.

    ``overrides``: other fields of the training recipe (``lr``, ``warmup_steps``, ...), passed to
    :func:`~golore_lab.lm.pretrain.recipe` (e.g. a warm-up scaled to a shorter run of larger batches)."""
    from .data import ensure_corpus

    cfg = recipe(model, steps=steps, batch_size=batch_size, **overrides)
    rank = rank or cfg.rank
    corpus = corpus or ensure_corpus(log=log)
    task = LMTask(corpus, LlamaConfig.preset(model))
    net = task.build_model(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=0.0)
    names = [name for name, p in net.named_parameters() if is_subspace_weight(name, p)]
    reference = [task.batch(i, chunk, seed + 10_000) for i in range(0, reference_windows, chunk)]
    generator = torch.Generator().manual_seed(seed)
    frames = []
    position = 0  # the training stream's position (windows consumed)
    for step in range(steps + 1):
        if step % every == 0:
            small = task.batch(10**7 + position, batch_size, seed + 20_000)  # fresh windows, not trained on
            large = [task.batch(10**7 + position + batch_size * (k + 1), batch_size, seed + 20_000)
                     for k in range(large_factor)]
            frame = layer_capture(net, task.loss, names, reference, small, large, rank, generator)
            with torch.no_grad():
                frame["val_loss"] = task.evaluate(net)["val_loss"]
            frames.append(frame.assign(step=step))
            log(f"step {step}: val loss {frame.val_loss.iloc[0]:.3f}, mean captured svd {frame.svd.mean():.3f} "
                f"svd_large {frame.svd_large.mean():.3f} random {frame.random.mean():.3f}")
        if step == steps:
            break
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg)
        opt.zero_grad(set_to_none=True)
        task.loss(net, task.batch(position, batch_size, seed)).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        position += batch_size
    out = pd.concat(frames, ignore_index=True)
    out["kind"] = out.layer.str.extract(r"\.(attn|mlp)\.")[0]
    return out
