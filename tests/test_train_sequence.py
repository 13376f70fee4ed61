"""Sequence tasks in the train and eval steps: next-token prediction with GPT-tiny.

Logits ``(B, L, V)`` with ``(B, L)`` integer labels, a per-position padding mask under
``batch["weight"]``, perplexity, token batches under ``batch["tokens"]``, NNX GPT-tiny with
dropout, and the errors of bad labels and masks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mixjax import models, train

VOCAB = 16
LEN = 8
BATCH = 4
STEPS = 20
GPT = dict(context=LEN, layers=1, heads=2, dim=16)


def successor_batch(seed, batch=BATCH):
    """The successor task: token t + 1 follows token t (mod VOCAB), from random starts."""
    rng = np.random.default_rng(seed)
    seqs = (rng.integers(0, VOCAB, (batch, 1)) + np.arange(LEN + 1)) % VOCAB
    return {"tokens": seqs[:, :-1].astype(np.int32), "label": seqs[:, 1:].astype(np.int32)}


def padding_mask(batch=BATCH, seed=0):
    """A right-padding mask: sequence i has ``lengths[i]`` real tokens (the last one has none)."""
    lengths = np.random.default_rng(seed).integers(1, LEN + 1, batch)
    lengths[-1] = 0
    return np.arange(LEN)[None, :] < lengths[:, None]


def numpy_init(module, x):
    """The module's params drawn with NumPy (kernels and tables scaled by their fan-in)."""
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        name = path[-1].key
        if name == "scale":
            return np.ones(leaf.shape, np.float32)
        if name == "bias":
            return np.zeros(leaf.shape, np.float32)
        fan_in = np.prod(leaf.shape[:-1]) if name == "kernel" else leaf.shape[-1]
        return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

    abstract = jax.eval_shape(module.init, jax.random.key(0), x)
    return jax.tree.map(jnp.asarray, jax.tree_util.tree_map_with_path(draw, abstract))


def masked_cross_entropy(logits, labels, weight):
    """The reference: NumPy float64 log-softmax, weighted mean over the positions."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]
    w = np.asarray(weight, np.float64)
    correct = (np.argmax(logits, -1) == labels).astype(np.float64)
    return (w * nll).sum() / w.sum(), (w * correct).sum() / w.sum()


@pytest.fixture(scope="module")
def gpt():
    module = models.GPTTiny(VOCAB, **GPT)
    params = numpy_init(module, jnp.zeros((1, LEN), jnp.int32))["params"]
    tx = optax.adam(1e-2)
    apply_fn = train.linen_apply(module, train_kwarg="train")
    return dict(
        module=module,
        params=params,
        tx=tx,
        init=lambda: train.init_train_state(params, tx, key=jax.random.key(0)),
        step=train.make_train_step(apply_fn, tx, donate=False),
        evaluate=train.make_eval_step(apply_fn),
    )


def test_gpt_trains_on_next_token_prediction(gpt):
    data = [successor_batch(seed) for seed in range(STEPS)]
    stacked = {k: np.stack([d[k] for d in data]) for k in data[0]}
    step = train.make_train_step(
        train.linen_apply(gpt["module"], train_kwarg="train"), gpt["tx"], steps_per_call=STEPS
    )
    state, metrics = step(gpt["init"](), stacked)
    losses = np.asarray(metrics["loss"])
    assert losses.shape == (STEPS,) and np.all(np.isfinite(losses))
    assert losses[-5:].mean() < 0.5 * losses[:5].mean(), losses
    np.testing.assert_allclose(metrics["perplexity"], np.exp(losses), rtol=1e-6)
    assert float(metrics["accuracy"][-1]) > float(metrics["accuracy"][0])
    held_out = gpt["evaluate"](state, successor_batch(99, batch=16))
    assert float(held_out["loss"]) < 0.5 * losses[0]


def test_masked_loss_equals_a_hand_computation(gpt):
    """Train and eval losses on a padded batch: ``sum(w * nll) / sum(w)`` over positions."""
    batch = dict(successor_batch(1), weight=padding_mask())
    state = gpt["init"]()
    logits = gpt["module"].apply({"params": state.params}, batch["tokens"])
    want_loss, want_acc = masked_cross_entropy(logits, batch["label"], batch["weight"])
    new, metrics = gpt["step"](state, batch)
    assert sorted(metrics) == ["accuracy", "loss", "perplexity"]
    assert all(m.dtype == jnp.float32 and m.shape == () for m in metrics.values())
    np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], want_acc, rtol=1e-6)
    np.testing.assert_allclose(metrics["perplexity"], np.exp(want_loss), rtol=1e-5)
    # Float weights, and the eval step on the updated state, against the same reference.
    weights = np.random.default_rng(3).random((BATCH, LEN)).astype(np.float32)
    logits = gpt["module"].apply({"params": new.params}, batch["tokens"])
    for weight in (batch["weight"], weights):
        want_loss, want_acc = masked_cross_entropy(logits, batch["label"], weight)
        got = gpt["evaluate"](new, dict(batch, weight=weight))
        np.testing.assert_allclose(got["loss"], want_loss, rtol=1e-5)
        np.testing.assert_allclose(got["accuracy"], want_acc, rtol=1e-6)
        np.testing.assert_allclose(got["perplexity"], np.exp(want_loss), rtol=1e-5)
    # No weight: the plain mean over all B * L positions.
    want_loss, _ = masked_cross_entropy(logits, batch["label"], np.ones((BATCH, LEN)))
    got = gpt["evaluate"](new, successor_batch(1))
    np.testing.assert_allclose(got["loss"], want_loss, rtol=1e-5)


def test_padded_positions_do_not_count(gpt):
    """Whatever a weight-0 position holds (another token, an id outside the vocabulary), the
    loss and the gradient are those of the real positions."""
    batch = dict(successor_batch(2), weight=padding_mask(seed=1))
    state = gpt["init"]()
    want, want_metrics = gpt["step"](state, batch)
    pad = ~batch["weight"]
    for filler in (0, -1, VOCAB + 5):
        label = np.where(pad, filler, batch["label"]).astype(np.int32)
        tokens = np.where(pad, 3, batch["tokens"]).astype(np.int32)  # causal: no effect before
        got, metrics = gpt["step"](state, dict(batch, label=label, tokens=tokens))
        np.testing.assert_allclose(metrics["loss"], want_metrics["loss"], rtol=1e-6)
        for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # An all-padding batch: loss 0 and no update, rather than 0 / 0.
    empty = dict(batch, weight=np.zeros((BATCH, LEN), bool))
    got, metrics = gpt["step"](state, empty)
    assert float(metrics["loss"]) == 0.0 and float(metrics["accuracy"]) == 0.0
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_softmax_cross_entropy_any_leading_dims(harness):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
    ids = rng.integers(0, 5, (2, 3)).astype(np.int32)
    soft = rng.dirichlet(np.ones(5), (2, 3)).astype(np.float32)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    fn = harness(train.softmax_cross_entropy)
    out = fn(jnp.asarray(logits), jnp.asarray(ids))
    assert out.shape == (2, 3) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, -np.take_along_axis(log_p, ids[..., None], -1)[..., 0], 1e-6)
    np.testing.assert_allclose(fn(logits, soft), -(soft * log_p).sum(-1), rtol=1e-6)


def test_metrics_and_weighted_mean(harness):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 4, 6)).astype(np.float32)
    labels = rng.integers(0, 6, (3, 4)).astype(np.int32)
    weight = rng.random((3, 4)).astype(np.float32)
    per_position = train.softmax_cross_entropy(logits, labels)
    got = harness(train.metrics)(logits, labels, per_position, weight)
    want_loss, want_acc = masked_cross_entropy(logits, labels, weight)
    np.testing.assert_allclose(got["loss"], want_loss, rtol=1e-5)
    np.testing.assert_allclose(got["accuracy"], want_acc, rtol=1e-6)
    np.testing.assert_allclose(got["perplexity"], np.exp(want_loss), rtol=1e-5)
    # A per-sequence weight (a prefix of the positions) counts each position with its row's.
    rows = np.array([1.0, 0.0, 2.0], np.float32)
    np.testing.assert_allclose(
        harness(train.weighted_mean)(per_position, rows),
        masked_cross_entropy(logits, labels, np.broadcast_to(rows[:, None], (3, 4)))[0],
        rtol=1e-5,
    )
    assert float(harness(train.weighted_mean)(per_position, np.zeros((3, 4)))) == 0.0
    # Classification logits (B, C): no perplexity, as before.
    flat = train.metrics(logits[:, 0], labels[:, 0], per_position[:, 0])
    assert sorted(flat) == ["accuracy", "loss"]


# ----------------------------------------------------------------------------------------------
# NNX GPT-tiny with dropout, through nnx_apply.


def test_nnx_gpt_with_dropout_trains_and_evaluates_deterministically():
    model = models.NNXGPTTiny(VOCAB, **GPT, dropout=0.2, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(1e-2)
    apply_fn = train.nnx_apply(graphdef)
    step = train.make_train_step(apply_fn, tx, donate=False)
    evaluate = train.make_eval_step(apply_fn)
    batch = dict(successor_batch(4), weight=padding_mask(seed=2))

    def init(seed):
        return train.init_train_state(params, tx, key=jax.random.key(seed), model_state=rest)

    (a, ma), (b, mb), (c, mc) = (step(init(seed), batch) for seed in (1, 1, 2))
    assert float(ma["loss"]) == float(mb["loss"]) != float(mc["loss"])
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(x, y)
    # Eval: dropout off, whatever the key; the masked loss of the model in eval mode.
    model = nnx.merge(graphdef, a.params, a.model_state)
    model.eval()
    want, _ = masked_cross_entropy(model(batch["tokens"]), batch["label"], batch["weight"])
    for state in (a, a._replace(rng=jax.random.key(7))):
        np.testing.assert_allclose(evaluate(state, batch)["loss"], want, rtol=1e-5)
    for _ in range(STEPS):
        a, metrics = step(a, batch)
    assert float(metrics["loss"]) < 0.7 * float(ma["loss"])


# ----------------------------------------------------------------------------------------------
# Bad input: labels outside the vocabulary, masks and labels of the wrong shape.


def test_labels_outside_the_vocabulary():
    logits = jnp.zeros((2, 3, 5))
    labels = np.array([[0, 1, 2], [3, 7, 4]], np.int32)
    with pytest.raises(
        ValueError,
        match=r"softmax_cross_entropy: labels must be class ids in \[0, 5\) \(the logits' last "
        r"axis, logits \(2, 3, 5\)\), got 7 at index \(1, 1\) \(1 of 6 out of range\)",
    ):
        train.softmax_cross_entropy(logits, labels)
    negative = np.array([[0, -1, 2], [3, 4, -2]], np.int32)
    with pytest.raises(ValueError, match=r"got -1 at index \(0, 1\) \(2 of 6 out of range\)"):
        train.softmax_cross_entropy(logits, negative)
    # Traced labels cannot be checked: their positions are NaN (never a wrapped-around class).
    out = np.asarray(jax.jit(train.softmax_cross_entropy)(logits, labels))
    assert np.isnan(out[1, 1]) and np.isfinite(np.delete(out.ravel(), 4)).all()
    np.testing.assert_allclose(np.delete(out.ravel(), 4), np.log(5.0), rtol=1e-6)


def test_labels_outside_the_vocabulary_in_the_step_make_the_loss_nan(gpt):
    batch = successor_batch(5)
    batch["label"][0, 2] = VOCAB
    _, metrics = gpt["step"](gpt["init"](), batch)
    assert np.isnan(float(metrics["loss"])) and np.isnan(float(metrics["perplexity"]))


def test_mask_of_the_wrong_shape(gpt):
    batch = successor_batch(6)
    state = gpt["init"]()
    for fn, name in ((gpt["step"], "make_train_step"), (gpt["evaluate"], "make_eval_step")):
        with pytest.raises(
            ValueError,
            match=rf"{name}: batch\['weight'\] \(4, 7\) must have the shape of the per-position "
            r"losses \(4, 8\) \(batch\['label'\] int32 \(4, 8\), logits \(4, 8, 16\)\)",
        ):
            fn(state, dict(batch, weight=np.ones((BATCH, LEN - 1), np.float32)))
        with pytest.raises(ValueError, match=r"batch\['weight'\] \(3, 8\) must have the shape"):
            fn(state, dict(batch, weight=np.ones((BATCH - 1, LEN), np.float32)))
        with pytest.raises(TypeError, match=r"batch\['weight'\] must be a float, integer or bool"):
            fn(state, dict(batch, weight=np.ones((BATCH, LEN), np.complex64)))


def test_labels_that_do_not_match_the_logits(gpt):
    batch = successor_batch(7)
    state = gpt["init"]()
    with pytest.raises(
        ValueError,
        match=r"make_train_step: batch\['label'\] must be integer class ids of the logits' "
        r"leading dims \(4, 8\) or a float distribution \(4, 8, 16\) for logits \(4, 8, 16\), "
        r"got int32 \(4, 7\)",
    ):
        gpt["step"](state, dict(batch, label=batch["label"][:, 1:]))
    with pytest.raises(ValueError, match=r"make_eval_step: batch\['label'\] must be integer"):
        gpt["evaluate"](state, dict(batch, label=batch["label"].astype(np.float32)))
    with pytest.raises(ValueError, match=r"batch\['tokens'\] \(4, 8\) and batch\['label'\] \(3,"):
        gpt["step"](state, dict(batch, label=batch["label"][:3]))
    with pytest.raises(ValueError, match=r"batch has both 'image' .* and 'tokens' \(4, 8\)"):
        gpt["step"](state, dict(batch, image=batch["tokens"]))
