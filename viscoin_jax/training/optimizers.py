"""The optimisers the trainers build from `config.optim` (optax): Adam, AdamW or SGD with an optional
warm-up, cosine decay and gradient clipping."""

from __future__ import annotations

from typing import Any

import optax


def make_optimizer(optim: Any, num_steps: int) -> optax.GradientTransformation:
    """Adam/AdamW/SGD with an optional linear warm-up and cosine decay, from `config.optim`."""
    lr = float(optim.learning_rate)
    warmup = int(optim.get("warmup_steps", 0))
    schedule_name = optim.get("schedule", "constant")
    if schedule_name == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(num_steps, warmup + 1))
    elif schedule_name == "constant":
        schedule = optax.join_schedules([optax.linear_schedule(0.0, lr, max(warmup, 1)),
                                         optax.constant_schedule(lr)], [max(warmup, 1)]) if warmup else lr
    else:
        raise ValueError(f"unknown optim.schedule {schedule_name!r}; known: constant, cosine")
    name = optim.get("name", "adam")
    b1, b2 = float(optim.get("b1", 0.9)), float(optim.get("b2", 0.999))
    if name == "adam":
        tx = optax.adam(schedule, b1=b1, b2=b2, eps=float(optim.get("eps", 1e-8)))
    elif name == "adamw":
        tx = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=float(optim.get("weight_decay", 0.0)))
    elif name == "sgd":
        tx = optax.sgd(schedule, momentum=float(optim.get("momentum", 0.9)), nesterov=True)
        if float(optim.get("weight_decay", 0.0)):
            tx = optax.chain(optax.add_decayed_weights(float(optim.weight_decay)), tx)
    else:
        raise ValueError(f"unknown optim.name {name!r}; known: adam, adamw, sgd")
    clip = float(optim.get("grad_clip", 0.0))
    return optax.chain(optax.clip_by_global_norm(clip), tx) if clip > 0 else tx
