"""A slow, obviously-right float64 reference of the paper's algorithms, written from the formulas.

Plain numpy, one matrix, one step at a time, no shared code with :mod:`golore_lab.optim` except the random
basis itself (the random draw is an input of the algorithm, not part of it). The SVD is numpy's, an
independent code path; every rule here is invariant to the signs of singular vectors.
"""
from __future__ import annotations

import numpy as np
import torch

from golore_lab.projection import projected_side, random_stiefel, refresh_generator


def reference_run(w0, grad_fn, steps, *, rule, rank, update_proj_gap, proj_type="std", projection="svd",
                  switch_step=None, state_on_refresh="project", seed=0, scale=1.0, lr=1e-2, betas=(0.9, 0.999),
                  eps=1e-8, weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False):
    """Run the subspace method on one matrix from ``w0``; ``grad_fn(t, W)`` gives the gradient. Returns all iterates."""
    W = np.array(w0, dtype=np.float64)
    m, n = W.shape
    side = projected_side((m, n), proj_type)
    P = None
    m1 = v = buf = None
    moment_start = 0
    history = [W.copy()]
    for t in range(steps):
        G = torch.as_tensor(grad_fn(t, W)).double().numpy()
        if rule == "sgd" and weight_decay:
            G = G + weight_decay * W
        if t % update_proj_gap == 0:
            use_random = projection == "random" or (switch_step is not None and t >= switch_step)
            if use_random:
                dim = m if side == "left" else n
                P_new = random_stiefel(dim, rank, refresh_generator(seed, 0, t), torch.float64).numpy()
            else:
                U, _, Vt = np.linalg.svd(G, full_matrices=False)
                P_new = U[:, :rank] if side == "left" else Vt[:rank].T
            if P is not None and state_on_refresh == "project":
                if side == "left":
                    O = P_new.T @ P                       # (r, r)
                    carry1 = lambda S: O @ S              # noqa: E731
                    carry2 = lambda S: (O * O) @ S        # noqa: E731
                else:
                    O = P.T @ P_new
                    carry1 = lambda S: S @ O              # noqa: E731
                    carry2 = lambda S: S @ (O * O)        # noqa: E731
                if m1 is not None:
                    m1, v = carry1(m1), carry2(v)
                if buf is not None:
                    buf = carry1(buf)
            if P is not None and state_on_refresh == "reset":
                m1 = v = buf = None
                moment_start = t
            P = P_new
        R = P.T @ G if side == "left" else G @ P
        if rule == "adamw":
            b1, b2 = betas
            if m1 is None:
                m1, v = np.zeros_like(R), np.zeros_like(R)
            m1 = b1 * m1 + (1 - b1) * R
            v = b2 * v + (1 - b2) * R * R
            k = t + 1 - moment_start
            N = (m1 / (1 - b1**k)) / (np.sqrt(v) / np.sqrt(1 - b2**k) + eps)
            W = W * (1 - lr * weight_decay)
        else:
            if momentum:
                buf = R.copy() if buf is None else momentum * buf + (1 - dampening) * R
                N = R + momentum * buf if nesterov else buf
            else:
                N = R
        W = W - lr * scale * (P @ N if side == "left" else N @ P.T)
        history.append(W.copy())
    return history
