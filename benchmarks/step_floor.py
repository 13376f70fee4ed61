"""The floor under :mod:`step`'s components: the same work hand-written into the plain step.

A component's cost inside ``mixjax.train`` is compared with the least work it must add to the
plain Flax + optax step, written by hand into that step (one ``jax.jit``, donated state, so XLA
fuses the elementwise passes into the step's own as it would for a user who wrote them), on the
kernels the pruning transform selects:

* ``prune``: the forward uses ``where(mask, w, 0)`` (its gradient is the masked gradient); once
  every ``BLOCK`` steps (one ``lax.cond``) new masks from a 1024-bin histogram of ``|w|`` per
  kernel (one scatter pass, a threshold, one compare pass);
* ``cluster``: Deep Compression's tied weights with fixed assignments: forward
  ``take(segment_sum(w, ids) / counts, ids)``, backward ``take(segment_sum(g, ids), ids)`` (two
  scatters and two gathers per kernel), pruned weights kept 0 and out of the means; the live
  ids and counts are recomputed when the masks are, every ``BLOCK`` steps
  (``mixjax.share.cluster`` counts the live members every step, from its input view, since it
  cannot know when a transform before it zeroes weights);
* ``quant``: int8 fake-quant with per-output-feature scales and a straight-through gradient;
  the scales (max-abs reductions) refreshed in the same ``lax.cond`` every ``BLOCK`` steps;
* ``delay``: Adam on the gradient of ``tau = 2`` steps ago, DC-ASGD corrected
  (``g + lam * g * g * (w_now - w_then)``), from ring buffers of past gradients and params;
* ``augment``: the same :mod:`mixjax.augment` chain on the batch (its ops are the work);
* ``full``: all of them in one step.

:func:`floor_step` builds one; :func:`accounting` turns the timings into the milliseconds table.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mixjax import data

CLUSTERS = 16
BINS = 1024
SPARSITY = 0.9
TAU = 2
LAM = 0.04  # DC-ASGD's default strength
PARTS = ("prune", "cluster", "quant", "delay", "augment")
FLOOR_GOAL = 1.2  # issue 16's bound on the full stack over its floor


def _selected(masks: Any) -> list[bool]:
    return [m is not None for m in jax.tree.leaves(masks, is_leaf=lambda m: m is None)]


def _new_mask(w: jax.Array) -> jax.Array:
    a = jnp.abs(w)
    top = jnp.maximum(jnp.max(a), 1e-30)
    bins = jnp.minimum((a * (BINS / top)).astype(jnp.int32), BINS - 1)
    counts = jax.ops.segment_sum(jnp.ones(a.size, jnp.float32), bins.ravel(), BINS)
    cut = jnp.searchsorted(jnp.cumsum(counts), SPARSITY * a.size)
    return a > cut.astype(jnp.float32) * (top / BINS)


def _scale(w: jax.Array) -> jax.Array:  # per output feature: the last axis
    return jnp.maximum(jnp.max(jnp.abs(w), axis=tuple(range(w.ndim - 1))), 1e-30) / 127.0


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tied(w, ids, counts, clusters):
    # ids == clusters for dead (pruned) weights: segment_sum drops them, the view keeps 0.
    means = jax.ops.segment_sum(w.ravel(), ids, clusters) / counts
    out = jnp.where(ids < clusters, jnp.take(means, ids, mode="clip"), 0.0)
    return out.reshape(w.shape)


def _tied_fwd(w, ids, counts, clusters):
    return _tied(w, ids, counts, clusters), ids


def _tied_bwd(clusters, ids, g):
    total = jax.ops.segment_sum(g.ravel(), ids, clusters)
    out = jnp.where(ids < clusters, jnp.take(total, ids, mode="clip"), 0.0)
    return out.reshape(g.shape), None, None


_tied.defvjp(_tied_fwd, _tied_bwd)


def _live_ids(ids, mask, clusters):
    """Cluster ids with dead weights sent out of range, and each cluster's live count."""
    live = jnp.where(mask.ravel(), ids, clusters) if mask is not None else jnp.copy(ids)
    counts = jax.ops.segment_sum(jnp.ones(live.size, jnp.float32), live, clusters)
    return live, jnp.maximum(counts, 1.0)


def _fake_quant(w, scale):
    q = jnp.clip(jnp.round(w * (1.0 / scale)), -127, 127) * scale
    return w + jax.lax.stop_gradient(q - w)


def _cluster_refresh(state: dict) -> None:
    """Live ids and counts of each kernel's clusters, from the current masks (in place)."""
    masks = state.get("masks", [None] * len(state["ids"]))
    pairs = [_live_ids(i, m, CLUSTERS) for i, m in zip(state["ids"], masks, strict=True)]
    state["live_ids"], state["counts"] = [p[0] for p in pairs], [p[1] for p in pairs]


def floor_state(params: Any, masks: Any, parts: tuple[str, ...]) -> dict:
    """The state a floor step carries besides params and Adam's: per selected kernel its mask,
    cluster ids and counts, int8 scales; the delay's ring buffers; the step count."""
    leaves = jax.tree.leaves(params)
    picked = [w for w, hit in zip(leaves, _selected(masks), strict=True) if hit]
    rng = np.random.default_rng(0)
    state: dict[str, Any] = {"t": jnp.zeros((), jnp.int32)}
    if "prune" in parts:
        state["masks"] = [_new_mask(w) for w in picked]
    if "cluster" in parts:
        state["ids"] = [jnp.asarray(rng.integers(0, CLUSTERS, w.size), jnp.int32) for w in picked]
        _cluster_refresh(state)
    if "quant" in parts:
        state["scales"] = [_scale(w) for w in picked]
    if "delay" in parts:
        ring = lambda x: jnp.zeros((TAU + 1, *x.shape), x.dtype)  # noqa: E731
        state["past_params"] = jax.tree.map(ring, params)
        state["past_grads"] = jax.tree.map(ring, params)
    return state


def floor_step(
    model: Any,
    tx: optax.GradientTransformation,
    masks: Any,
    parts: tuple[str, ...],
    *,
    every: int,
    num_classes: int,
    augment: Any = None,
):
    """The plain step of :mod:`step` with ``parts`` (of :data:`PARTS`) written into it by hand;
    masks and scales refresh every ``every`` steps.

    ``step(carry, batch) -> (carry, metrics)`` with ``carry = (params, model_state, opt_state,
    floor_state(...))``, jitted with the carry donated.
    """
    kwargs = {} if model.train_kwarg is None else {model.train_kwarg: True}
    selected = _selected(masks)

    def view(params, fs):
        leaves, treedef = jax.tree.flatten(params)
        out, k = [], 0
        for w, hit in zip(leaves, selected, strict=True):
            if hit:
                if "prune" in parts:
                    w = jnp.where(fs["masks"][k], w, 0.0)
                if "cluster" in parts:
                    w = _tied(w, fs["live_ids"][k], fs["counts"][k], CLUSTERS)
                if "quant" in parts:
                    w = _fake_quant(w, fs["scales"][k])
                k += 1
            out.append(w)
        return treedef.unflatten(out)

    def refresh(params, fs):  # every BLOCK steps: new masks and scales
        picked = [w for w, hit in zip(jax.tree.leaves(params), selected, strict=True) if hit]
        fs = dict(fs)
        if "prune" in parts:
            fs["masks"] = [_new_mask(w) for w in picked]
        if "cluster" in parts:
            _cluster_refresh(fs)
        if "quant" in parts:
            fs["scales"] = [_scale(w) for w in picked]
        return fs

    def delayed(grads, params, fs):
        slot, old = fs["t"] % (TAU + 1), (fs["t"] + 1) % (TAU + 1)
        put = lambda ring, x: jax.lax.dynamic_update_index_in_dim(ring, x, slot, 0)  # noqa: E731
        past_g = jax.tree.map(put, fs["past_grads"], grads)
        past_w = jax.tree.map(put, fs["past_params"], params)
        take = lambda ring: jax.lax.dynamic_index_in_dim(ring, old, 0, keepdims=False)  # noqa: E731
        stale = jax.tree.map(
            lambda g, w, w0: g + LAM * g * g * (w - w0),
            jax.tree.map(take, past_g),
            params,
            jax.tree.map(take, past_w),
        )
        return stale, {**fs, "past_grads": past_g, "past_params": past_w}

    @functools.partial(jax.jit, donate_argnums=0)
    def step(carry, batch):
        params, model_state, opt_state, fs = carry
        images, labels = batch["image"], batch["label"]
        targets = labels
        if augment is not None:  # mixup makes (B, C) soft labels
            key = jax.random.fold_in(jax.random.key(0), fs["t"])
            images, targets = augment(key, images, labels)
        if targets.ndim == 1:
            targets = jax.nn.one_hot(targets, num_classes)
        images = data.normalize(images)

        def loss_fn(p):
            variables = {"params": view(p, fs), **model_state}
            if model_state:
                logits, new_state = model.module.apply(
                    variables, images, mutable=list(model_state), **kwargs
                )
            else:
                logits, new_state = model.module.apply(variables, images, **kwargs), model_state
            return optax.softmax_cross_entropy(logits, targets).mean(), (logits, new_state)

        (loss, (logits, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        if "delay" in parts:
            grads, fs = delayed(grads, params, fs)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if {"prune", "cluster", "quant"} & set(parts):
            fs = jax.lax.cond(fs["t"] % every == 0, refresh, lambda p, f: f, params, fs)
        fs = {**fs, "t": fs["t"] + 1}
        accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
        return (params, model_state, opt_state, fs), {"loss": loss, "accuracy": accuracy}

    return step


def accounting(step_ms: dict[str, float], floor_ms: dict[str, float]) -> dict[str, Any]:
    """Milliseconds per step: each component's cost over the wrapper beside its floor's over
    plain, the stack's, and what the stack costs beyond its components (the interaction
    remainder). ``floor_ms`` holds ``"plain"``, each part and ``"full"`` (floor steps)."""
    base = floor_ms["plain"]
    extra = {c: step_ms[c] - step_ms["mixjax"] for c in PARTS}
    floor = {c: floor_ms[c] - base for c in PARTS}
    stack, stack_floor = step_ms["full"] - step_ms["mixjax"], floor_ms["full"] - base
    return {
        "plain_ms": step_ms["plain"],
        "wrapper_ms": step_ms["mixjax"] - step_ms["plain"],
        "extra_ms": extra,
        "floor_ms": floor,
        "stack_extra_ms": stack,
        "stack_floor_ms": stack_floor,
        "remainder_ms": stack - sum(extra.values()),
        "floor_remainder_ms": stack_floor - sum(floor.values()),
        "full_over_floor": step_ms["full"] / floor_ms["full"],
    }


def print_accounting(rows: list[dict]) -> None:
    """One table per model: where each millisecond above the plain step goes."""
    for row in rows:
        a = row["accounting"]
        print(
            f"\n{row['model']} (batch {row['batch']}): ms per step above plain "
            f"({a['plain_ms']:.3f} ms), mixjax against the hand-written floor\n"
        )
        print("| part | mixjax ms above | floor ms above | mixjax - floor |")
        print("|---|---:|---:|---:|")
        print(f"| wrapper (identity transform) | {a['wrapper_ms']:+.3f} | | |")
        for c, ms in a["extra_ms"].items():
            floor = a["floor_ms"][c]
            print(f"| {c} | {ms:+.3f} | {floor:+.3f} | {ms - floor:+.3f} |")
        print(
            f"| interaction remainder | {a['remainder_ms']:+.3f} | "
            f"{a['floor_remainder_ms']:+.3f} | |"
        )
        print(
            f"| full stack | {a['stack_extra_ms']:+.3f} | {a['stack_floor_ms']:+.3f} | "
            f"{a['stack_extra_ms'] - a['stack_floor_ms']:+.3f} |"
        )
        print(f"\nfull stack / its floor: {a['full_over_floor']:.2f}x (goal <= {FLOOR_GOAL}x)")
