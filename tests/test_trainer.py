"""The Hugging Face path: ``transformers.Trainer(..., optimizers=(opt, scheduler))`` with SubspaceAdamW.

A tiny randomly initialised LlamaForCausalLM (no download) learns one repeated batch through the Trainer's own
loop (accelerate's optimizer wrapper, gradient clipping, the scheduler): the subspace groups get rank-sized
state and refresh on schedule, and the loss falls.
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from golore_lab import SubspaceAdamW  # noqa: E402

STEPS, GAP, RANK = 6, 3, 4


def test_trainer_trains_with_subspace_adamw(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=88, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    with torch.random.fork_rng():  # transformers initialises from the global RNG: keep it to this test
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg)
    named = list(model.named_parameters())
    matrices = [p for n, p in named if n.endswith("_proj.weight")]
    others = [p for n, p in named if not n.endswith("_proj.weight")]
    opt = SubspaceAdamW([{"params": matrices, "rank": RANK, "update_proj_gap": GAP}, {"params": others}],
                        lr=3e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 2))
    refreshes = []
    opt.register_refresh_hook(lambda o, r: refreshes.append(r.step))

    tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": t, "labels": t} for t in tokens]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4,
                                          logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                                          disable_tqdm=True, seed=0, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, scheduler))
    trainer.train()

    assert sorted(set(refreshes)) == [0, GAP] and len(refreshes) == 2 * len(matrices)
    for p in matrices:
        state = opt.state[p]
        assert state["step"] == STEPS and state["exp_avg"].numel() == RANK * max(p.shape)  # r x (larger side)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == STEPS and losses[-1] < losses[0]
