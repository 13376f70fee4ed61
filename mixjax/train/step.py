"""The composed training step: one jitted function from a batch to new parameters and metrics.

:func:`make_train_step` builds ``step(state, batch) -> (state, metrics)``, one ``jax.jit`` with
the state's buffers donated, that runs, for step ``t = state.step``::

    key_t = fold_in(state.rng, t); augment_key, model_key = split(key_t)
    x, labels = augment(augment_key, batch["image"], batch["label"])        # optional
    x = preprocess(x)                                                       # optional
    view = transform.apply(params, transform_state)       # the compressed forward view
    logits, model_state = apply_fn(view, model_state, x, train=True, key=model_key)
    grads = grad(weighted_mean(loss(logits, labels), batch.get("weight")))(params)   # STEs
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

A batch is a dict (:data:`BATCH_KEYS`; other keys are ignored):

* the model input under exactly one of :data:`INPUT_KEYS`: ``"image"`` for images ``(B, H, W,
  C)`` (what :func:`mixjax.data.batches` yields), ``"tokens"`` for token ids ``(B, L)``; the
  step treats both the same (``augment`` and ``preprocess`` get it), the name says what it is;
* ``"label"``: integer ids of the logits' leading dims, ``(B,)`` for ``(B, C)`` logits or
  ``(B, L)`` for next-token logits ``(B, L, V)`` (the tokens shifted by one: ``tokens =
  text[i : i + L]``, ``label = text[i + 1 : i + L + 1]``; the step does not shift), or soft
  labels ``(..., V)``;
* optionally ``"weight"``: a per-position weight or padding mask of the labels' leading dims
  (float, integer or bool; or a prefix of them, e.g. ``(B,)`` per sequence); the loss and the
  metrics are then weighted means, ``sum(w * loss) / max(sum(w), EPS)``
  (:func:`mixjax.train.weighted_mean`), and positions of weight 0 do not count at all.

The metrics (:func:`mixjax.train.metrics`) are float32 ``"loss"`` and ``"accuracy"``, plus
``"perplexity"`` (``exp(loss)``) for sequence tasks, logits with more than one leading dim.

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
from mixjax.train.losses import check_labels, metrics, softmax_cross_entropy, weighted_mean
from mixjax.train.state import TrainState, check_opt_state, trained

__all__ = [
    "BATCH_KEYS",
    "INPUT_KEYS",
    "Step",
    "TrainStep",
    "make_eval_step",
    "make_train_step",
]

_STEP = "mixjax.train.make_train_step"
_EVAL = "mixjax.train.make_eval_step"
_STATE = "a mixjax.train.TrainState (from init_train_state)"
INPUT_KEYS = ("image", "tokens")
"""The keys a batch may hold its model input under (exactly one): images, or token ids."""
LABEL_KEY = "label"
WEIGHT_KEY = "weight"
BATCH_KEYS = (*INPUT_KEYS, LABEL_KEY, WEIGHT_KEY)
"""Every key the steps read: the input (one of :data:`INPUT_KEYS`), ``"label"`` and the
optional ``"weight"``; other keys of a batch are ignored."""
Step = Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """The training step of :func:`make_train_step`: ``step(state, batch) -> (state, metrics)``.

    Attributes:
      pure: the step as a pure, un-jitted function of ``(state, batch)``, for wrappers that
        map or re-jit it (:func:`mixjax.parallel.data_parallel`, ``shard_map``, ``pmap``).
      jitted: ``jax.jit(pure)``, the state's buffers donated when ``donate``, that first
        checks (while tracing) that ``state.opt_state`` matches ``tx.init`` of the state's
        params (:func:`check_opt_state`); calling the :class:`TrainStep` calls it. ``pure``
        skips that check: inside ``shard_map`` a replica's optimizer state may hold its own
        block of a split array (:func:`mixjax.delay.replica_delayed`), not what ``tx.init``
        of the replicated params gives.
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


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(jnp.shape(x))


def _check_batch(fn_name: str, batch: Any, steps_per_call: int) -> str:
    """Static checks of a batch's keys, shapes and weight dtype (at trace time, so free on
    later calls); returns the input key, ``"image"`` or ``"tokens"``."""
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"{fn_name}: batch must be a dict with keys {BATCH_KEYS} (the input under 'image' "
            f"or 'tokens', 'label', optionally 'weight'), got {type(batch).__name__}"
        )
    inputs = [k for k in INPUT_KEYS if k in batch]
    missing = ([] if inputs else [" or ".join(map(repr, INPUT_KEYS))]) + (
        [] if LABEL_KEY in batch else [repr(LABEL_KEY)]
    )
    if missing:
        raise ValueError(
            f"{fn_name}: batch is missing key(s) [{', '.join(missing)}]; a batch holds the model "
            f"input under 'image' (images) or 'tokens' (token ids), the targets under 'label' "
            f"and optionally a per-position 'weight', got {sorted(batch)}"
        )
    if len(inputs) > 1:
        raise ValueError(
            f"{fn_name}: batch has both 'image' {_shape(batch['image'])} and 'tokens' "
            f"{_shape(batch['tokens'])}; the model input must be under exactly one of them"
        )
    used = [inputs[0], LABEL_KEY] + ([WEIGHT_KEY] if WEIGHT_KEY in batch else [])
    lead = 1 if steps_per_call > 1 else 0
    if steps_per_call > 1:
        for k in used:
            shape = _shape(batch[k])
            if not shape or shape[0] != steps_per_call:
                raise ValueError(
                    f"{fn_name}: steps_per_call={steps_per_call} needs a stacked batch "
                    f"(steps_per_call, B, ...) (see mixjax.data.stacked_batches), got "
                    f"batch[{k!r}] of shape {shape}"
                )
    x, labels = _shape(batch[inputs[0]]), _shape(batch[LABEL_KEY])
    if len(x) <= lead or len(labels) <= lead or x[lead] != labels[lead]:
        raise ValueError(
            f"{fn_name}: batch[{inputs[0]!r}] {x} and batch['label'] {labels} must have the "
            f"same batch size on axis {lead}"
        )
    if WEIGHT_KEY in batch:
        weight = batch[WEIGHT_KEY]
        dtype = jnp.result_type(weight)
        if not (
            jnp.issubdtype(dtype, jnp.floating)
            or jnp.issubdtype(dtype, jnp.integer)
            or jnp.issubdtype(dtype, jnp.bool_)
        ):
            raise TypeError(
                f"{fn_name}: batch['weight'] must be a float, integer or bool array (a "
                f"per-position weight or padding mask), got {dtype} {_shape(weight)}"
            )
        if len(_shape(weight)) <= lead or _shape(weight)[lead] != labels[lead]:
            raise ValueError(
                f"{fn_name}: batch['weight'] {_shape(weight)} must have the shape of the "
                f"per-position losses (batch['label'] {labels}), batch size on axis {lead}"
            )
    return inputs[0]


def _check_weight(fn_name: str, weight: Any, per_example: Any, labels: Any, logits: Any):
    """The weight must have the per-position losses' shape (or a prefix of it)."""
    shape, losses = _shape(weight), _shape(per_example)
    if not (len(shape) <= len(losses) and losses[: len(shape)] == shape):
        raise ValueError(
            f"{fn_name}: batch['weight'] {shape} must have the shape of the per-position "
            f"losses {losses} (batch['label'] {jnp.result_type(labels)} {_shape(labels)}, "
            f"logits {_shape(logits)}), or a prefix of it"
        )


def _select(batch: Mapping[str, Any], input_key: str) -> dict[str, Any]:
    """The arrays the step reads: ``{"input", "label"[, "weight"]}`` (other keys dropped)."""
    out = {"input": batch[input_key], LABEL_KEY: batch[LABEL_KEY]}
    if WEIGHT_KEY in batch:
        out[WEIGHT_KEY] = batch[WEIGHT_KEY]
    return out


def _compute_loss(fn_name, loss, logits, labels, weight, *, augmented: bool):
    """``(mean loss, per-position losses)``, the labels and weight checked against the logits
    (the built-in loss's labels named as the batch's key)."""
    if loss is softmax_cross_entropy:
        name = "batch['label'] (after augment)" if augmented else "batch['label']"
        check_labels(fn_name, logits, labels, name=name)
    per_example = loss(logits, labels)
    if weight is not None:
        _check_weight(fn_name, weight, per_example, labels, logits)
    return weighted_mean(per_example, weight), per_example


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
      augment: ``augment(key, x, labels) -> (x, labels)`` of the batch's input and labels,
        e.g. ``mixjax.augment.chain(...)``; label-mixing ops return ``(B, C)`` soft labels.
      preprocess: ``x -> x`` after augmentation, in train and eval, e.g.
        ``mixjax.data.normalize``.
      loss: ``(logits, labels) -> per-position losses`` (default
        :func:`softmax_cross_entropy`: ``(...)`` for ``(..., V)`` logits); the step minimizes
        their mean, weighted by ``batch["weight"]`` where the batch has one.
      steps_per_call: ``K >= 1`` steps per call. ``K = 1``: ``batch`` holds ``(B, ...)``
        arrays and metrics are scalars. ``K > 1``: ``batch`` holds ``(K, B, ...)`` arrays, step
        ``k`` uses ``batch[...][k]``, metrics have shape ``(K,)``; the result equals ``K``
        calls of the ``K = 1`` step.
      donate: donate the state's buffers to the step (updated in place; the state passed in is
        invalid afterwards).

    Returns:
      A :class:`TrainStep`, ``step(state, batch) -> (state, metrics)``, jitted, with ``batch``
      a dict as the module docstring says (``"image"`` or ``"tokens"``, ``"label"``,
      optionally ``"weight"``) and ``metrics`` a dict of float32 ``"loss"`` (the weighted mean
      loss before the update), ``"accuracy"`` (of the training forward pass, against the
      argmax of soft labels) and, for sequence tasks, ``"perplexity"`` (``exp(loss)``).

    Raises:
      TypeError (here): a non-callable ``apply_fn``/``augment``/``preprocess``/``loss``, a bad
        ``tx`` or ``transform``, a non-bool ``donate``.
      TypeError / ValueError (here): ``steps_per_call`` not an integer ``>= 1``.
      TypeError / ValueError (first call, while tracing): a state that is not a
        :class:`TrainState`; a batch without an input (``"image"`` or ``"tokens"``) or
        ``"label"``, with both inputs, whose leading axis is not ``steps_per_call`` (for
        ``K > 1``), or whose input, labels and weight differ in batch size; a weight that is
        not float, integer or bool, or whose shape is not the per-position losses' (or a
        prefix of it); with the built-in loss, labels that do not fit the model's logits
        (named ``batch['label']``); an optimizer state that does not mirror the state's params
        (:func:`check_opt_state`: params replaced, or an ``opt_state`` made on other params or
        by another ``tx``). Label *values* are traced, so ids outside ``[0, V)`` cannot be
        caught here: they make the loss NaN (:func:`softmax_cross_entropy`), unless weighted 0.
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
        inputs, labels, weight = batch["input"], batch[LABEL_KEY], batch.get(WEIGHT_KEY)
        if augment is not None:
            inputs, labels = augment(augment_key, inputs, labels)
        if preprocess is not None:
            inputs = preprocess(inputs)

        # The optimizer trains the params and, where the transform has any, its learned state.
        learned = learned_state(state.transform_state)
        learns = bool(jax.tree.leaves(learned))

        def objective(trainable):
            params, new_learned = trainable if learns else (trainable, learned)
            transform_state = with_learned_state(state.transform_state, new_learned)
            view = transform.apply(params, transform_state)
            logits, model_state = apply_fn(
                view, state.model_state, inputs, train=True, key=model_key
            )
            mean, per_example = _compute_loss(
                _STEP, loss, logits, labels, weight, augmented=augment is not None
            )
            return mean, (logits, per_example, model_state)

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
        return new_state, metrics(logits, labels, per_example, weight)

    def step(state, batch):
        _checks.instance(_STEP, "state", state, TrainState, _STATE)
        batch = _select(batch, _check_batch(_STEP, batch, steps_per_call))
        if steps_per_call == 1:
            return one_step(state, batch)
        return lax.scan(one_step, state, batch)

    def checked_step(state, batch):
        _checks.instance(_STEP, "state", state, TrainState, _STATE)
        check_opt_state(_STEP, tx, trained(state.params, state.transform_state), state.opt_state)
        return step(state, batch)

    jitted = jax.jit(checked_step, donate_argnums=(0,) if donate else ())
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
      preprocess: ``x -> x``, as in training.
      loss: ``(logits, labels) -> per-position losses``, as in training.

    Returns:
      ``eval_step(state, batch) -> {"loss", "accuracy"[, "perplexity"]}``: float32 means over
      the batch's positions, weighted by ``batch["weight"]`` where it has one (the batch as in
      :func:`make_train_step`). To combine batches, weight each batch's loss by its total
      weight (its number of examples, or ``sum(batch["weight"])``) and take ``exp`` of the
      combined loss for the perplexity.

    Raises:
      TypeError / ValueError: as :func:`make_train_step` (here, or for the state and batch at
        the first call).
    """
    transform = identity() if transform is None else transform
    _check_model(_EVAL, apply_fn, transform, preprocess, loss)

    def eval_step(state, batch):
        _checks.instance(_EVAL, "state", state, TrainState, _STATE)
        batch = _select(batch, _check_batch(_EVAL, batch, 1))
        inputs, labels, weight = batch["input"], batch[LABEL_KEY], batch.get(WEIGHT_KEY)
        if preprocess is not None:
            inputs = preprocess(inputs)
        view = transform.apply(state.params, state.transform_state)
        logits, _ = apply_fn(view, state.model_state, inputs, train=False, key=state.rng)
        _, per_example = _compute_loss(_EVAL, loss, logits, labels, weight, augmented=False)
        return metrics(logits, labels, per_example, weight)

    return jax.jit(eval_step)
