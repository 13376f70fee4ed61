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

so a :class:`TrainState` always satisfies
``params == transform.constrain(params, transform_state)``: pruned weights are exactly zero under
the current masks. With ``steps_per_call=K`` the step runs ``K`` of these per dispatch with
``lax.scan`` over a stacked batch ``(K, B, ...)`` (:func:`mixjax.data.stacked_batches`) and
returns metrics of shape ``(K,)``; nothing is fetched to the host inside the step, so a training
loop that keeps the metric arrays and reads them once per epoch never waits on the device.

The model is any function with the signature of :class:`ApplyFn`; :func:`linen_apply` and
:func:`nnx_apply` adapt Flax linen modules and NNX graphdefs::

    # linen
    variables = module.init(key, images)
    params = variables.pop("params")               # variables: the rest, e.g. batch_stats
    apply_fn = mixjax.train.linen_apply(module)
    # NNX
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    apply_fn = mixjax.train.nnx_apply(graphdef)

Example::

    transform = mixjax.chain(mixjax.prune.magnitude(0.8), mixjax.quant.fake_quant(8))
    tx = mixjax.delay.delayed(optax.adam(1e-3), 2, compensation="dc")
    state = mixjax.train.init_train_state(params, tx, transform=transform, key=jax.random.key(0))
    step = mixjax.train.make_train_step(apply_fn, tx, transform=transform, steps_per_call=10)
    for batch in mixjax.data.stacked_batches(dataset, 128, 10):
        state, metrics = step(state, batch)        # metrics["loss"]: (10,), fetched lazily
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax

from mixjax.core import ParamTransform, identity

_STEP = "mixjax.train.make_train_step"
_EVAL = "mixjax.train.make_eval_step"
_INIT = "mixjax.train.init_train_state"
_LOSS = "mixjax.train.softmax_cross_entropy"
_LINEN = "mixjax.train.linen_apply"
_NNX = "mixjax.train.nnx_apply"
_STATE = "a mixjax.train.TrainState (from init_train_state)"
BATCH_KEYS = ("image", "label")


class TrainState(NamedTuple):
    """Everything a training step reads and writes; a pytree (donated to the jitted step).

    Attributes:
      step: int32 scalar, the number of steps taken; the next step is step ``t = step``.
      params: the stored (float) parameters, a linen ``params`` dict or an NNX ``nnx.State``;
        they satisfy ``transform.constrain(params, transform_state) == params``.
      opt_state: the state of the user's optax transformation (e.g. a
        :class:`mixjax.delay.DelayState`).
      transform_state: the compression transform's state (masks, codebooks, scales).
      model_state: non-parameter model variables the forward pass updates: linen collections
        other than ``params`` (a dict, e.g. ``{"batch_stats": ...}``, ``{}`` if none) or the
        NNX non-``Param`` state (batch statistics, RNG streams); ``None`` if the model has none.
      rng: the base ``jax.random`` key (a typed key scalar or a raw ``uint32`` ``(2,)`` key); step
        ``t`` draws from ``jax.random.fold_in(rng, t)``, so the key never changes and a run
        resumed at step ``t`` draws what an uninterrupted one would.
    """

    step: jax.Array
    params: Any
    opt_state: optax.OptState
    transform_state: Any
    model_state: Any
    rng: jax.Array


class ApplyFn(Protocol):
    """The model interface: ``(params, model_state, images, *, train, key) -> (logits, state)``.

    ``params`` is the (compressed) parameter view, ``images`` a ``(B, ...)`` batch, ``train``
    a static bool (dropout on, batch statistics updated), ``key`` a ``jax.random`` key for the
    model's randomness. Returns ``(B, num_classes)`` logits and the new ``model_state`` (of the
    same structure; returned unchanged when ``train=False``).

    Activation quantization fits as model state, the observers' statistics::

        act = mixjax.activations.fake_quant(8)
        base = mixjax.train.linen_apply(module)

        def apply_fn(params, act_state, images, *, train, key):
            fn = lambda x: base(params, None, x, train=train, key=key)[0]
            return act.apply(fn, act_state, images, mode="train" if train else "eval")

        model_state = act.init(lambda x: module.apply({"params": params}, x), images)
    """

    def __call__(
        self, params: Any, model_state: Any, images: jax.Array, *, train: bool, key: jax.Array
    ) -> tuple[jax.Array, Any]: ...


def linen_apply(
    module: nn.Module, *, train_kwarg: str | None = None, rng_stream: str = "dropout"
) -> ApplyFn:
    """The :class:`ApplyFn` of a linen module: ``module.apply({"params": params, **state}, x)``.

    ``model_state`` is the dict of the module's other variable collections (``{}`` if none); in
    training every one of them is mutable and returned updated (batch statistics).

    Args:
      module: the linen module.
      train_kwarg: the module's ``__call__`` keyword that switches training behaviour (e.g.
        ``"train"``), passed ``train``; ``None`` when the module takes none.
      rng_stream: the RNG collection that gets ``key`` in training (dropout's ``"dropout"``).

    Raises:
      TypeError: ``module`` is not a linen module.
    """
    _expect(isinstance(module, nn.Module), _LINEN, "module", "a flax.linen Module", module)

    def apply(params, model_state, images, *, train, key):
        variables = {"params": params, **(model_state or {})}
        kwargs = {} if train_kwarg is None else {train_kwarg: train}
        if not train:
            return module.apply(variables, images, **kwargs), model_state
        rngs = {rng_stream: key}
        if not model_state:
            return module.apply(variables, images, rngs=rngs, **kwargs), model_state
        logits, updated = module.apply(
            variables, images, rngs=rngs, mutable=list(model_state), **kwargs
        )
        return logits, {**model_state, **updated}

    return apply


def nnx_apply(graphdef: nnx.GraphDef, *, rng_stream: str = "dropout") -> ApplyFn:
    """The :class:`ApplyFn` of an NNX model split as ``nnx.split(model, nnx.Param, ...)``.

    Each call merges ``graphdef`` with the parameter view and ``model_state`` (the non-``Param``
    state; ``None`` or an empty state if the model has none), switches the copy to
    ``train()``/``eval()`` mode, reseeds its ``rng_stream`` streams with ``key`` in training and
    returns the new non-``Param`` state.

    Raises:
      TypeError: ``graphdef`` is not an NNX ``GraphDef``.
    """
    expected = "an nnx.GraphDef (from nnx.split(model, nnx.Param, ...))"
    _expect(isinstance(graphdef, nnx.GraphDef), _NNX, "graphdef", expected, graphdef)

    def apply(params, model_state, images, *, train, key):
        # copy=True: fresh Variables at this trace level, which reseed and BatchNorm may mutate
        # (merging the caller's Variables inside jax.grad would mutate them across traces).
        states = () if model_state is None else (model_state,)
        model = nnx.merge(graphdef, params, *states, copy=True)
        if train:
            model.train()
            nnx.reseed(model, **{rng_stream: key})
        else:
            model.eval()
        logits = model(images)
        if model_state is None or not train:
            return logits, model_state
        return logits, nnx.state(model, nnx.Not(nnx.Param))

    return apply


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy for integer or soft labels.

    Args:
      logits: ``(B, C)`` floats.
      labels: ``(B,)`` integer class ids, or ``(B, C)`` floats, a distribution per example (as
        returned by ``mixjax.augment.mixup``/``cutmix``/``label_smoothing``).

    Returns:
      ``(B,)`` losses in the logits' dtype.

    Raises:
      ValueError: labels neither ``(B,)`` integers nor ``(B, C)`` floats matching ``logits``.
    """
    labels = jnp.asarray(labels)
    if labels.shape == logits.shape[:1] and jnp.issubdtype(labels.dtype, jnp.integer):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    if labels.shape == logits.shape and jnp.issubdtype(labels.dtype, jnp.floating):
        return optax.softmax_cross_entropy(logits, labels)
    raise ValueError(
        f"{_LOSS}: labels must be integer class ids {logits.shape[:1]} or a float distribution "
        f"{logits.shape} for logits {logits.shape}, got {labels.dtype} {labels.shape}"
    )


def _classes(labels: jax.Array) -> jax.Array:
    return labels if labels.ndim == 1 else jnp.argmax(labels, axis=-1)


def _metrics(logits, labels, per_example):
    correct = jnp.argmax(logits, axis=-1) == _classes(labels)
    return {"loss": jnp.mean(per_example), "accuracy": jnp.mean(correct.astype(jnp.float32))}


def _expect(ok: bool, fn_name: str, arg: str, expected: str, value: Any) -> None:
    if not ok:
        raise TypeError(f"{fn_name}: {arg} must be {expected}, got {type(value).__name__}")


def _check_key(fn_name: str, key: Any) -> None:
    typed = isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    raw = isinstance(key, (jax.Array, np.ndarray)) and key.dtype == np.uint32 and key.shape == (2,)
    if not ((typed and key.ndim == 0) or raw):
        raise TypeError(
            f"{fn_name}: key must be a jax.random.key(...) scalar or a raw uint32 (2,) key, "
            f"got {getattr(key, 'dtype', type(key).__name__)} {getattr(key, 'shape', '')}"
        )


def _check_tx(fn_name: str, tx: Any) -> None:
    ok = hasattr(tx, "init") and hasattr(tx, "update")
    _expect(ok, fn_name, "tx", "an optax GradientTransformation", tx)


def _check_transform(fn_name: str, transform: Any) -> None:
    _expect(
        isinstance(transform, ParamTransform), fn_name, "transform", "a ParamTransform", transform
    )


def _check_model(fn_name, apply_fn, transform, preprocess, loss):
    adapters = "callable (a mixjax.train.ApplyFn: linen_apply, nnx_apply)"
    _expect(callable(apply_fn), fn_name, "apply_fn", adapters, apply_fn)
    _check_transform(fn_name, transform)
    _expect(
        preprocess is None or callable(preprocess), fn_name, "preprocess", "callable", preprocess
    )
    _expect(callable(loss), fn_name, "loss", "callable", loss)


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


def init_train_state(
    params: Any,
    tx: optax.GradientTransformation,
    *,
    key: jax.Array,
    transform: ParamTransform | None = None,
    model_state: Any = None,
) -> TrainState:
    """The state at step 0: ``transform.init``, constrained params, ``tx.init``.

    The returned state owns its buffers (every leaf is a fresh copy), so the train step, which
    donates them, never invalidates the caller's ``params``, ``model_state`` or ``key``.

    Args:
      params: the initial float parameters (linen ``params`` dict or NNX ``nnx.State``).
      tx: the optax transformation the train step will use.
      key: the base ``jax.random`` key of augmentation and model randomness.
      transform: the compression transform (default :func:`mixjax.identity`).
      model_state: non-parameter model variables (see :class:`TrainState`).

    Raises:
      TypeError: ``tx`` not an optax transformation, ``transform`` not a ParamTransform or
        ``key`` not a ``jax.random`` key.
    """
    transform = identity() if transform is None else transform
    _check_tx(_INIT, tx)
    _check_transform(_INIT, transform)
    _check_key(_INIT, key)
    transform_state = transform.init(params)
    params = transform.constrain(params, transform_state)
    state = TrainState(
        step=jnp.zeros([], jnp.int32),
        params=params,
        opt_state=tx.init(params),
        transform_state=transform_state,
        model_state=model_state,
        rng=key,
    )
    return jax.tree.map(jnp.copy, state)


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
) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
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
      ``step(state, batch) -> (state, metrics)``, jitted, with ``batch`` a dict with keys
      ``"image"`` and ``"label"`` (as :func:`mixjax.data.batches` yields) and ``metrics`` a dict
      of float32 ``"loss"`` (mean loss before the update) and ``"accuracy"`` (of the training
      forward pass, against the argmax of soft labels).

    Raises:
      TypeError (here): a non-callable ``apply_fn``/``augment``/``preprocess``/``loss``, a bad
        ``tx`` or ``transform``, a non-bool ``donate``.
      ValueError (here): ``steps_per_call`` not an integer ``>= 1``.
      TypeError / ValueError (first call, while tracing): a state that is not a
        :class:`TrainState`; a batch without ``"image"``/``"label"``, or whose leading axis is
        not ``steps_per_call`` (for ``K > 1``), or whose images and labels differ in batch size.
    """
    transform = identity() if transform is None else transform
    _check_model(_STEP, apply_fn, transform, preprocess, loss)
    _check_tx(_STEP, tx)
    _expect(augment is None or callable(augment), _STEP, "augment", "callable", augment)
    if (
        isinstance(steps_per_call, bool)
        or not isinstance(steps_per_call, (int, np.integer))
        or steps_per_call < 1
    ):
        raise ValueError(f"{_STEP}: steps_per_call must be an int >= 1, got {steps_per_call!r}")
    _expect(isinstance(donate, bool), _STEP, "donate", "a bool", donate)
    steps_per_call = int(steps_per_call)

    def one_step(state, batch):
        t = state.step
        augment_key, model_key = jax.random.split(jax.random.fold_in(state.rng, t))
        images, labels = batch["image"], batch["label"]
        if augment is not None:
            images, labels = augment(augment_key, images, labels)
        if preprocess is not None:
            images = preprocess(images)

        def objective(params):
            view = transform.apply(params, state.transform_state)
            logits, model_state = apply_fn(
                view, state.model_state, images, train=True, key=model_key
            )
            per_example = loss(logits, labels)
            return jnp.mean(per_example), (logits, per_example, model_state)

        grads, (logits, per_example, model_state) = jax.grad(objective, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = transform.constrain(
            optax.apply_updates(state.params, updates), state.transform_state
        )
        transform_state = transform.update(params, state.transform_state, t, grads=grads)
        params = transform.constrain(params, transform_state)
        new_state = TrainState(
            step=t + 1,
            params=params,
            opt_state=opt_state,
            transform_state=transform_state,
            model_state=model_state,
            rng=state.rng,
        )
        return new_state, _metrics(logits, labels, per_example)

    def step(state, batch):
        _expect(isinstance(state, TrainState), _STEP, "state", _STATE, state)
        _check_batch(_STEP, batch, steps_per_call)
        batch = {k: batch[k] for k in BATCH_KEYS}
        if steps_per_call == 1:
            return one_step(state, batch)
        return lax.scan(one_step, state, batch)

    return jax.jit(step, donate_argnums=(0,) if donate else ())


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
        _expect(isinstance(state, TrainState), _EVAL, "state", _STATE, state)
        _check_batch(_EVAL, batch, 1)
        images, labels = batch["image"], batch["label"]
        if preprocess is not None:
            images = preprocess(images)
        view = transform.apply(state.params, state.transform_state)
        logits, _ = apply_fn(view, state.model_state, images, train=False, key=state.rng)
        per_example = loss(logits, labels)
        return _metrics(logits, labels, per_example)

    return jax.jit(eval_step)
