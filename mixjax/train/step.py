"""The composed training step: one jitted function from a batch to new parameters and metrics.

:func:`make_train_step` builds ``step(state, batch) -> (state, metrics)``, one ``jax.jit`` with
the state's buffers donated, that runs, for step ``t = state.step``::

    key_t = fold_in(state.rng, t); augment_key, model_key = split(key_t)
    images, labels = augment(augment_key, batch["image"], batch["label"])   # optional
    images = preprocess(images)                                             # optional
    view = transform.apply(params, transform_state)       # the compressed forward view
    logits, model_state = apply_fn(view, model_state, images, train=True, key=model_key)
    grads = grad(mean(loss(logits, labels)))(params)      # through the STEs to stored params
    updates, opt_state = tx.update(grads, opt_state, params)   # any optax tx, e.g. delayed(...)
    params = transform.constrain(params + updates, transform_state)   # wrap_optax semantics
    transform_state = transform.update(params, transform_state, t, grads=grads)
    params = transform.constrain(params, transform_state)   # constraints of the new state

where the transform learns part of its state (LSQ step sizes, :func:`mixjax.quant.lsq`), the
gradient and the optimizer update cover ``(params, learned)`` (:func:`mixjax.train.trained`),
so the learned fields train with the same ``tx``. So a :class:`TrainState` always satisfies
``params == transform.constrain(params, transform_state)``: pruned weights are exactly zero under
the current masks. With ``steps_per_call=K`` the step runs ``K`` of these per dispatch with
``lax.scan`` over a stacked batch ``(K, B, ...)`` (:func:`mixjax.data.stacked_batches`) and
returns metrics of shape ``(K,)``; nothing is fetched to the host inside the step, so a training
loop that keeps the metric arrays and reads them once per epoch never waits on the device.

The model is any function with the signature of :class:`mixjax.train.ApplyFn`
(:func:`mixjax.train.linen_apply`, :func:`mixjax.train.nnx_apply`). The step is a
:class:`TrainStep`: callable, and carrying what the parallel wrappers (:mod:`mixjax.parallel`)
need to know about it, its pure function, its model and ``steps_per_call``.

Example::

    transform = mixjax.chain(mixjax.prune.magnitude(0.8), mixjax.quant.fake_quant(8))
    tx = mixjax.delay.delayed(optax.adam(1e-3), 2, compensation="dc")
    state = mixjax.train.init_train_state(params, tx, transform=transform, key=jax.random.key(0))
    step = mixjax.train.make_train_step(apply_fn, tx, transform=transform, steps_per_call=10)
    for batch in mixjax.data.stacked_batches(dataset, 128, 10):
        state, metrics = step(state, batch)        # metrics["loss"]: (10,), fetched lazily
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

from mixjax import _checks
from mixjax.core import ParamTransform, identity, learned_state, with_learned_state
from mixjax.train.apply import ApplyFn
from mixjax.train.losses import metrics, softmax_cross_entropy
from mixjax.train.state import TrainState

__all__ = ["BATCH_KEYS", "Step", "TrainStep", "make_eval_step", "make_train_step"]

_STEP = "mixjax.train.make_train_step"
_EVAL = "mixjax.train.make_eval_step"
_STATE = "a mixjax.train.TrainState (from init_train_state)"
BATCH_KEYS = ("image", "label")
Step = Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """The training step of :func:`make_train_step`: ``step(state, batch) -> (state, metrics)``.

    Attributes:
      pure: the step as a pure, un-jitted function of ``(state, batch)``, for wrappers that
        map or re-jit it (:func:`mixjax.parallel.data_parallel`, ``shard_map``, ``pmap``).
      jitted: ``jax.jit(pure)``, the state's buffers donated when ``donate``; calling the
        :class:`TrainStep` calls it.
      apply_fn: the model the step was built with (a :func:`mixjax.parallel.replica_apply`
        model averages its gradients over the replicas).
      steps_per_call: ``K``, the steps per call (``K > 1``: a stacked ``(K, B, ...)`` batch).
      donate: whether ``jitted`` donates the state.
    """

    pure: Step
    jitted: Step
    apply_fn: ApplyFn
    steps_per_call: int
    donate: bool

    def __call__(
        self, state: TrainState, batch: Mapping[str, jax.Array]
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        return self.jitted(state, batch)


def _check_model(fn_name, apply_fn, transform, preprocess, loss):
    adapters = "callable (a mixjax.train.ApplyFn: linen_apply, nnx_apply)"
    if not callable(apply_fn):
        raise TypeError(f"{fn_name}: apply_fn must be {adapters}, got {type(apply_fn).__name__}")
    _checks.instance(fn_name, "transform", transform, ParamTransform, "a ParamTransform")
    _checks.callable_or_none(fn_name, "preprocess", preprocess)
    _checks.callable_or_none(fn_name, "loss", loss, optional=False)


def _check_batch(fn_name: str, batch: Any, steps_per_call: int) -> None:
    """Static checks of a batch's keys and shapes (at trace time, so free on later calls)."""
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"{fn_name}: batch must be a dict with keys {BATCH_KEYS}, got {type(batch).__name__}"
        )
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(
            f"{fn_name}: batch is missing key(s) {missing}; expected {BATCH_KEYS}, "
            f"got {sorted(batch)}"
        )
    images, labels = (jnp.shape(batch[k]) for k in BATCH_KEYS)
    lead = 1 if steps_per_call > 1 else 0
    if steps_per_call > 1:
        for k, shape in zip(BATCH_KEYS, (images, labels), strict=True):
            if not shape or shape[0] != steps_per_call:
                raise ValueError(
                    f"{fn_name}: steps_per_call={steps_per_call} needs a stacked batch "
                    f"(steps_per_call, B, ...) (see mixjax.data.stacked_batches), got "
                    f"batch[{k!r}] of shape {shape}"
                )
    if len(images) <= lead or len(labels) <= lead or images[lead] != labels[lead]:
        raise ValueError(
            f"{fn_name}: batch['image'] {images} and batch['label'] {labels} must have the "
            f"same batch size on axis {lead}"
        )


def make_train_step(
    apply_fn: ApplyFn,
    tx: optax.GradientTransformation,
    *,
    transform: ParamTransform | None = None,
    augment: Callable[..., tuple[jax.Array, jax.Array]] | None = None,
    preprocess: Callable[[jax.Array], jax.Array] | None = None,
    loss: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy,
    steps_per_call: int = 1,
    donate: bool = True,
) -> TrainStep:
    """The jitted training step (see the module docstring for what it composes).

    Args:
      apply_fn: the model, an :class:`ApplyFn` (:func:`linen_apply`, :func:`nnx_apply`).
      tx: any optax transformation, e.g. ``mixjax.delay.delayed(optax.adam(1e-3), 2)``; its
        ``update`` gets ``(grads, opt_state, params)``. The state must come from
        :func:`init_train_state` with the same ``tx`` and ``transform``.
      transform: the compression transform (default :func:`mixjax.identity`).
      augment: ``augment(key, images, labels) -> (images, labels)``, e.g.
        ``mixjax.augment.chain(...)``; label-mixing ops return ``(B, C)`` soft labels.
      preprocess: ``images -> images`` after augmentation, in train and eval, e.g.
        ``mixjax.data.normalize``.
      loss: ``(logits, labels) -> (B,)`` per-example losses (default
        :func:`softmax_cross_entropy`); the step minimizes their mean.
      steps_per_call: ``K >= 1`` steps per call. ``K = 1``: ``batch`` holds ``(B, ...)``
        arrays and metrics are scalars. ``K > 1``: ``batch`` holds ``(K, B, ...)`` arrays, step
        ``k`` uses ``batch[...][k]``, metrics have shape ``(K,)``; the result equals ``K``
        calls of the ``K = 1`` step.
      donate: donate the state's buffers to the step (updated in place; the state passed in is
        invalid afterwards).

    Returns:
      A :class:`TrainStep`, ``step(state, batch) -> (state, metrics)``, jitted, with ``batch``
      a dict with keys ``"image"`` and ``"label"`` (as :func:`mixjax.data.batches` yields) and
      ``metrics`` a dict of float32 ``"loss"`` (mean loss before the update) and
      ``"accuracy"`` (of the training forward pass, against the argmax of soft labels).

    Raises:
      TypeError (here): a non-callable ``apply_fn``/``augment``/``preprocess``/``loss``, a bad
        ``tx`` or ``transform``, a non-bool ``donate``.
      TypeError / ValueError (here): ``steps_per_call`` not an integer ``>= 1``.
      TypeError / ValueError (first call, while tracing): a state that is not a
        :class:`TrainState`; a batch without ``"image"``/``"label"``, or whose leading axis is
        not ``steps_per_call`` (for ``K > 1``), or whose images and labels differ in batch size.
    """
    transform = identity() if transform is None else transform
    _check_model(_STEP, apply_fn, transform, preprocess, loss)
    _checks.optax_transform(_STEP, "tx", tx)
    _checks.callable_or_none(_STEP, "augment", augment)
    steps_per_call = _checks.integer(_STEP, "steps_per_call", steps_per_call, 1)
    donate = _checks.boolean(_STEP, "donate", donate)

    def one_step(state, batch):
        t = state.step
        augment_key, model_key = jax.random.split(jax.random.fold_in(state.rng, t))
        images, labels = batch["image"], batch["label"]
        if augment is not None:
            images, labels = augment(augment_key, images, labels)
        if preprocess is not None:
            images = preprocess(images)

        # The optimizer trains the params and, where the transform has any, its learned state.
        learned = learned_state(state.transform_state)
        learns = bool(jax.tree.leaves(learned))

        def objective(trainable):
            params, new_learned = trainable if learns else (trainable, learned)
            transform_state = with_learned_state(state.transform_state, new_learned)
            view = transform.apply(params, transform_state)
            logits, model_state = apply_fn(
                view, state.model_state, images, train=True, key=model_key
            )
            per_example = loss(logits, labels)
            return jnp.mean(per_example), (logits, per_example, model_state)

        trainable = (state.params, learned) if learns else state.params
        grads, (logits, per_example, model_state) = jax.grad(objective, has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, state.opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        (params, learned), grads = (
            (trainable, grads[0]) if learns else ((trainable, learned), grads)
        )
        transform_state = with_learned_state(state.transform_state, learned)
        params = transform.constrain(params, transform_state)
        transform_state = transform.update(params, transform_state, t, grads=grads)
        params = transform.constrain(params, transform_state)
        new_state = TrainState(
            step=t + 1,
            params=params,
            opt_state=opt_state,
            transform_state=transform_state,
            model_state=model_state,
            rng=state.rng,
        )
        return new_state, metrics(logits, labels, per_example)

    def step(state, batch):
        _checks.instance(_STEP, "state", state, TrainState, _STATE)
        _check_batch(_STEP, batch, steps_per_call)
        batch = {k: batch[k] for k in BATCH_KEYS}
        if steps_per_call == 1:
            return one_step(state, batch)
        return lax.scan(one_step, state, batch)

    jitted = jax.jit(step, donate_argnums=(0,) if donate else ())
    return TrainStep(step, jitted, apply_fn, steps_per_call, donate)


def make_eval_step(
    apply_fn: ApplyFn,
    *,
    transform: ParamTransform | None = None,
    preprocess: Callable[[jax.Array], jax.Array] | None = None,
    loss: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy,
) -> Callable[[TrainState, Mapping[str, jax.Array]], dict[str, jax.Array]]:
    """The jitted evaluation step on the compressed view ``transform.apply(params, state)``.

    The model runs with ``train=False``; nothing is updated or donated.

    Args:
      apply_fn: the model (:class:`ApplyFn`).
      transform: the compression transform of the training run (default identity).
      preprocess: ``images -> images``, as in training.
      loss: ``(logits, labels) -> (B,)`` per-example losses.

    Returns:
      ``eval_step(state, batch) -> {"loss", "accuracy"}``: float32 means over the ``(B, ...)``
      batch (weight them by batch size to combine batches of different sizes).

    Raises:
      TypeError: as :func:`make_train_step` (here, or for the state and batch at the first call).
      ValueError: a batch without ``"image"``/``"label"`` (at the first call).
    """
    transform = identity() if transform is None else transform
    _check_model(_EVAL, apply_fn, transform, preprocess, loss)

    def eval_step(state, batch):
        _checks.instance(_EVAL, "state", state, TrainState, _STATE)
        _check_batch(_EVAL, batch, 1)
        images, labels = batch["image"], batch["label"]
        if preprocess is not None:
            images = preprocess(images)
        view = transform.apply(state.params, state.transform_state)
        logits, _ = apply_fn(view, state.model_state, images, train=False, key=state.rng)
        per_example = loss(logits, labels)
        return metrics(logits, labels, per_example)

    return jax.jit(eval_step)
