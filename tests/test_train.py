"""Tests of mixjax.train: the composed step, K steps per call, linen/NNX models, eval, errors."""

import textwrap
import types

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mixjax
from mixjax import augment, delay, models, prune, quant, schedules, share, train
from mixjax.quant import activations

CLASSES = 4
BATCH = 16
K = 4


def make_data(n, seed):
    """8x8x1 images in [0, 1]: class c lights rows 2c and 2c + 1 (flip-invariant), plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n).astype(np.int32)
    images = 0.3 * rng.random((n, 8, 8, 1), np.float32)
    for i, c in enumerate(labels):
        images[i, 2 * c : 2 * c + 2] += 0.7
    return {"image": images, "label": labels}


def stacked(steps, seed):
    data = make_data(steps * BATCH, seed)
    return {k: v.reshape(steps, BATCH, *v.shape[1:]) for k, v in data.items()}


def unstack(batch, k):
    return {key: value[k] for key, value in batch.items()}


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32)(x.reshape((x.shape[0], -1))))
        return nn.Dense(CLASSES)(x)


class NormDropNet(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = nn.Dense(16)(x.reshape((x.shape[0], -1)))
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.Dropout(0.5, deterministic=not train)(nn.relu(x))
        return nn.Dense(CLASSES)(x)


def counting(apply_fn, counter):
    def counted(params, model_state, images, *, train, key):
        counter.append(train)
        return apply_fn(params, model_state, images, train=train, key=key)

    return counted


# ----------------------------------------------------------------------------------------------
# The full stack: prune + cluster + fake-quant, augmentation, delayed DC-ASGD Adam.


@pytest.fixture(scope="module")
def full():
    module = MLP()
    params = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    transform = mixjax.chain(
        prune.magnitude(schedules.polynomial(0.0, 0.75, 0, 24)),
        # One clustered leaf and init="linear": the k-means compiles once, and fastest.
        share.cluster(16, per_channel=True, init="linear", where="Dense_0/kernel"),
        quant.fake_quant(8),
    )
    tx = delay.delayed(optax.adam(1e-2), 2, compensation="dc")
    aug = augment.chain(
        augment.random_flip(),
        augment.random_crop(padding=1),
        augment.random_brightness(0.1),
        augment.label_smoothing(0.1, num_classes=CLASSES),
    )
    traces = {"single": [], "multi": [], "eval": []}
    apply_fn = train.linen_apply(module)
    kwargs = dict(transform=transform, augment=aug)
    return types.SimpleNamespace(
        module=module,
        params=params,
        transform=transform,
        tx=tx,
        init=lambda: train.init_train_state(params, tx, transform=transform, key=jax.random.key(1)),
        single=train.make_train_step(counting(apply_fn, traces["single"]), tx, **kwargs),
        multi=train.make_train_step(
            counting(apply_fn, traces["multi"]), tx, steps_per_call=K, **kwargs
        ),
        evaluate=train.make_eval_step(counting(apply_fn, traces["eval"]), transform=transform),
        traces=traces,
    )


def test_k_step_scan_equals_k_single_steps(full):
    batch = stacked(K, seed=1)
    state = full.init()
    singles = []
    for k in range(K):
        state, metrics = full.single(state, unstack(batch, k))
        singles.append(metrics)
    scanned, metrics = full.multi(full.init(), batch)
    assert int(scanned.step) == K
    for name in ("loss", "accuracy"):
        assert metrics[name].shape == (K,) and metrics[name].dtype == jnp.float32
        np.testing.assert_allclose(metrics[name], [m[name] for m in singles], rtol=1e-6)
    chex.assert_trees_all_equal_shapes_and_dtypes(scanned, state)
    scanned, state = (s._replace(rng=jax.random.key_data(s.rng)) for s in (scanned, state))
    chex.assert_trees_all_equal(scanned, state)


def test_full_stack_trains_keeps_constraints_and_compiles_once(full):
    state = full.init()
    eval_batch = make_data(64, seed=99)
    before = full.evaluate(state, eval_batch)
    for call in range(10):
        state, metrics = full.multi(state, stacked(K, seed=10 + call))
        assert metrics["loss"].shape == (K,) and metrics["accuracy"].shape == (K,)
        masks = state.transform_state[0].masks
        for path, (w, m) in zip(
            ("Dense_0", "Dense_1"),
            ((state.params[d]["kernel"], masks[d]["kernel"]) for d in ("Dense_0", "Dense_1")),
            strict=True,
        ):
            w, m = np.asarray(w), np.asarray(m)
            assert np.all(w[~m] == 0.0), f"pruned weights of {path} not exactly zero"
    after = full.evaluate(state, eval_batch)
    assert int(state.step) == 10 * K
    assert float(after["loss"]) < 0.7 * float(before["loss"])
    assert float(after["accuracy"]) >= 0.9 > float(before["accuracy"])
    summary = prune.summary(state.params)
    assert summary.sparsity == pytest.approx(0.75, abs=0.01)
    # The compressed view: at most 16 distinct values (zero included) per output channel.
    view = full.transform.apply(state.params, state.transform_state)
    for column in np.asarray(view["Dense_0"]["kernel"]).T:
        assert np.unique(column).size <= 16
    # One trace per jitted function, whatever the number of calls.
    assert full.traces["multi"] == [True]
    assert full.traces["eval"] == [False]


def test_single_step_compiles_once(full):
    state = full.init()
    for seed in range(5):
        state, metrics = full.single(state, make_data(BATCH, seed))
        assert metrics["loss"].shape == () and metrics["loss"].dtype == jnp.float32
    assert full.traces["single"] == [True]


# ----------------------------------------------------------------------------------------------
# Against a hand-written optax step; linen model state; NNX models.


def test_identity_step_equals_a_hand_written_optax_step():
    module = MLP()
    params = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    tx = optax.sgd(0.1, momentum=0.9)

    @jax.jit
    def reference(params, opt_state, batch):
        def loss_fn(p):
            logits = module.apply({"params": p}, batch["image"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return loss, optax.apply_updates(params, updates), opt_state

    step = train.make_train_step(train.linen_apply(module), tx)
    state = train.init_train_state(params, tx, key=jax.random.key(0))
    opt_state = tx.init(params)
    for seed in range(3):
        batch = make_data(BATCH, seed)
        loss, new_params, opt_state = reference(params, opt_state, batch)
        old, (state, metrics) = state, step(state, batch)
        # The step donates the state it is given, not the caller's arrays it was built from.
        assert old.params["Dense_0"]["kernel"].is_deleted()
        assert not params["Dense_0"]["kernel"].is_deleted()
        params = new_params
        np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
        chex.assert_trees_all_close(state.params, params, rtol=1e-6, atol=1e-7)
    assert int(state.step) == 3


def test_linen_batch_stats_and_dropout():
    module = NormDropNet()
    variables = module.init(jax.random.key(0), jnp.zeros((2, 8, 8, 1)), train=False)
    params, model_state = variables["params"], {"batch_stats": variables["batch_stats"]}
    tx = optax.adam(1e-3)
    apply_fn = train.linen_apply(module, train_kwarg="train")
    step = train.make_train_step(apply_fn, tx)
    evaluate = train.make_eval_step(apply_fn)
    batch = make_data(BATCH, 0)
    losses = []
    for seed in (1, 2):  # dropout draws come from the state's key
        state = train.init_train_state(
            params, tx, key=jax.random.key(seed), model_state=model_state
        )
        new, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[0] != losses[1]
    stats = new.model_state["batch_stats"]["BatchNorm_0"]
    assert not np.allclose(stats["mean"], 0.0)
    assert jax.tree.structure(new.model_state) == jax.tree.structure(model_state)

    @jax.jit
    def expected_loss(variables, images, labels):
        logits = module.apply(variables, images, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    expected = expected_loss({"params": new.params, **new.model_state}, *batch.values())
    np.testing.assert_allclose(evaluate(new, batch)["loss"], expected, rtol=1e-5)


def test_nnx_and_linen_give_the_same_steps():
    linen_model = models.LeNet300100(num_classes=CLASSES)
    params = linen_model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    nnx_model = models.NNXLeNet300100(64, CLASSES, rngs=nnx.Rngs(0))
    nnx.update(nnx_model, params)
    graphdef, nnx_params, nnx_rest = nnx.split(nnx_model, nnx.Param, ...)
    transform = quant.fake_quant(4)
    tx = optax.adam(1e-2)
    runs = {}
    for name, apply_fn, p, rest in (
        ("linen", train.linen_apply(linen_model), params, None),
        ("nnx", train.nnx_apply(graphdef), nnx_params, nnx_rest),
    ):
        step = train.make_train_step(apply_fn, tx, transform=transform)
        state = train.init_train_state(
            p, tx, transform=transform, key=jax.random.key(0), model_state=rest
        )
        for seed in range(3):
            state, metrics = step(state, make_data(BATCH, seed))
        runs[name] = (state, metrics)
    (linen_state, linen_metrics), (nnx_state, nnx_metrics) = runs.values()
    np.testing.assert_allclose(nnx_metrics["loss"], linen_metrics["loss"], rtol=1e-5)
    assert isinstance(nnx_state.params, nnx.State)
    for layer in ("Dense_0", "Dense_1", "Dense_2"):
        np.testing.assert_allclose(
            nnx_state.params[layer]["kernel"][...],
            linen_state.params[layer]["kernel"],
            rtol=1e-5,
            atol=1e-6,
        )


def test_nnx_model_state_is_carried():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.Dense_0 = nnx.Linear(64, 16, rngs=rngs)
            self.norm = nnx.BatchNorm(16, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)
            self.Dense_1 = nnx.Linear(16, CLASSES, rngs=rngs)

        def __call__(self, x):
            x = self.drop(nnx.relu(self.norm(self.Dense_0(x.reshape((x.shape[0], -1))))))
            return self.Dense_1(x)

    graphdef, params, rest = nnx.split(Net(nnx.Rngs(0, dropout=1)), nnx.Param, ...)
    tx = optax.sgd(0.1)
    apply_fn = train.nnx_apply(graphdef)
    step = train.make_train_step(apply_fn, tx, steps_per_call=2)
    state = train.init_train_state(params, tx, key=jax.random.key(0), model_state=rest)
    new, metrics = step(state, stacked(2, seed=0))
    assert metrics["loss"].shape == (2,)
    assert jax.tree.structure(new.model_state) == jax.tree.structure(rest)
    assert not np.allclose(new.model_state["norm"]["mean"][...], 0.0)
    batch = make_data(BATCH, 3)
    model = nnx.merge(graphdef, new.params, new.model_state)
    model.eval()
    expected = optax.softmax_cross_entropy_with_integer_labels(
        model(batch["image"]), batch["label"]
    ).mean()
    np.testing.assert_allclose(train.make_eval_step(apply_fn)(new, batch)["loss"], expected, 1e-5)


def test_activation_observers_as_model_state():
    """quantized_apply keeps the observers in the model state; a model without state of its own
    keeps None beside them."""
    module = MLP()
    images = jnp.asarray(make_data(BATCH, 0)["image"])
    params = module.init(jax.random.key(0), images)["params"]
    act = activations.activation_quant(8)
    qat = activations.quantized_apply(train.linen_apply(module), act)
    model_state = qat.init(params, None, images)
    tx = optax.sgd(0.1)
    state = train.init_train_state(params, tx, key=jax.random.key(0), model_state=model_state)
    new, metrics = train.make_train_step(qat.apply, tx, steps_per_call=2)(state, stacked(2, 0))
    assert sorted(new.model_state["act"]) == ["Dense_0/kernel", "Dense_1/kernel"]
    assert new.model_state["model"] is None
    for observed in new.model_state["act"].values():
        assert int(observed.count) == 2 and float(observed.max) > float(observed.min)
    batch = make_data(BATCH, 5)

    @jax.jit
    def expected_loss(params, act_state, images, labels):
        fn = lambda p, x: module.apply({"params": p}, x)
        logits, _ = act.apply(fn, act_state, params, images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    expected = expected_loss(new.params, new.model_state["act"], batch["image"], batch["label"])
    np.testing.assert_allclose(train.make_eval_step(qat.apply)(new, batch)["loss"], expected, 1e-5)


def test_adapters_match_direct_calls(harness):
    images = jnp.asarray(make_data(3, 0)["image"])
    module = MLP()
    params = module.init(jax.random.key(0), images)["params"]
    key = jax.random.key(1)
    for train_flag in (False, True):
        fn = harness(
            lambda p, x, t=train_flag: train.linen_apply(module)(p, None, x, train=t, key=key)
        )
        logits, state = fn(params, images)
        assert state is None
        np.testing.assert_allclose(logits, module.apply({"params": params}, images), rtol=1e-6)
    model = models.NNXLeNet300100(64, CLASSES, rngs=nnx.Rngs(0))
    graphdef, nnx_params, rest = nnx.split(model, nnx.Param, ...)
    fn = harness(lambda p, r, x: train.nnx_apply(graphdef)(p, r, x, train=True, key=key))
    logits, new_rest = fn(nnx_params, rest, images)
    np.testing.assert_allclose(logits, model(images), rtol=1e-6)
    assert jax.tree.structure(new_rest) == jax.tree.structure(rest)


# ----------------------------------------------------------------------------------------------
# Loss, donation.


def test_softmax_cross_entropy_integer_and_soft_labels(harness):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 3)).astype(np.float32)
    ids = np.array([0, 2, 1, 1, 0], np.int32)
    soft = rng.dirichlet(np.ones(3), 5).astype(np.float32)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    fn = harness(train.softmax_cross_entropy)
    out = fn(jnp.asarray(logits), jnp.asarray(ids))
    assert out.shape == (5,) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, -log_p[np.arange(5), ids], rtol=1e-6)
    np.testing.assert_allclose(fn(logits, soft), -(soft * log_p).sum(-1), rtol=1e-6)


def test_donate_false_keeps_the_input_state():
    step, state = tiny_setup()
    new, _ = step(state, make_data(BATCH, 0))
    assert not state.params["Dense_0"]["kernel"].is_deleted()
    assert int(new.step) == 1 and int(state.step) == 0


# ----------------------------------------------------------------------------------------------
# Errors.


def tiny_setup(**kwargs):
    module = MLP()
    params = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    tx = optax.sgd(0.1)
    step = train.make_train_step(train.linen_apply(module), tx, donate=False, **kwargs)
    return step, train.init_train_state(params, tx, key=jax.random.key(0))


@pytest.mark.parametrize(
    "value, error",
    [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError), ("2", TypeError)],
)
def test_bad_steps_per_call(value, error):
    with pytest.raises(error, match=r"make_train_step: steps_per_call must be an integer >= 1"):
        train.make_train_step(lambda *a, **k: None, optax.sgd(0.1), steps_per_call=value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(apply_fn=3), r"make_train_step: apply_fn must be callable.*got int"),
        (dict(tx="adam"), r"make_train_step: tx must be an optax GradientTransformation"),
        (dict(transform=prune.PruneState), r"make_train_step: transform must be a ParamTransform"),
        (dict(augment=1), r"make_train_step: augment must be callable or None, got int"),
        (dict(preprocess=1), r"make_train_step: preprocess must be callable or None, got int"),
        (dict(loss="ce"), r"make_train_step: loss must be callable, got str"),
        (dict(loss=None), r"make_train_step: loss must be callable, got NoneType"),
        (dict(donate=1), r"make_train_step: donate must be a bool, got donate=1"),
    ],
)
def test_bad_factory_arguments(kwargs, match):
    args = dict(apply_fn=lambda *a, **k: None, tx=optax.sgd(0.1))
    args.update(kwargs)
    with pytest.raises(TypeError, match=match):
        train.make_train_step(args.pop("apply_fn"), args.pop("tx"), **args)


def test_missing_batch_keys():
    step, state = tiny_setup()
    with pytest.raises(ValueError, match=r"batch is missing key\(s\) \['label'\].*got \['image'\]"):
        step(state, {"image": make_data(BATCH, 0)["image"]})
    with pytest.raises(TypeError, match=r"make_train_step: batch must be a dict.*got tuple"):
        step(state, (1, 2))
    evaluate = train.make_eval_step(train.linen_apply(MLP()))
    with pytest.raises(
        ValueError, match=r"make_eval_step: batch is missing key\(s\) \['image' or 'tokens'\]"
    ):
        evaluate(state, {"label": make_data(BATCH, 0)["label"]})


def test_batch_leading_axis_must_match_steps_per_call():
    step, state = tiny_setup(steps_per_call=3)
    with pytest.raises(ValueError, match=r"steps_per_call=3 needs a stacked batch .*\(2, 16, 8"):
        step(state, stacked(2, seed=0))
    with pytest.raises(ValueError, match=r"steps_per_call=3 needs a stacked batch .*\(16, 8"):
        step(state, make_data(BATCH, 0))


def test_images_and_labels_must_agree():
    step, state = tiny_setup()
    batch = make_data(BATCH, 0)
    with pytest.raises(ValueError, match=r"batch\['image'\] \(16, 8, 8, 1\) and batch\['label'\]"):
        step(state, {"image": batch["image"], "label": batch["label"][:5]})


def test_state_must_be_a_train_state():
    step, state = tiny_setup()
    with pytest.raises(TypeError, match=r"make_train_step: state must be a mixjax.train.TrainSt"):
        step(tuple(state), make_data(BATCH, 0))


def test_bad_labels():
    with pytest.raises(
        ValueError, match=r"softmax_cross_entropy: labels must be .*got float32 \(3,"
    ):
        train.softmax_cross_entropy(jnp.zeros((3, 4)), jnp.zeros((3,)))


def test_bad_init_and_adapters():
    params = {"w": jnp.ones((2, 2))}
    with pytest.raises(TypeError, match=r"init_train_state: key must be a jax.random.key"):
        train.init_train_state(params, optax.sgd(0.1), key=0)
    with pytest.raises(TypeError, match=r"init_train_state: tx must be an optax"):
        train.init_train_state(params, None, key=jax.random.key(0))
    with pytest.raises(TypeError, match=r"init_train_state: transform must be a ParamTransform"):
        train.init_train_state(params, optax.sgd(0.1), key=jax.random.key(0), transform=1)
    with pytest.raises(TypeError, match=r"linen_apply: module must be a flax.linen Module"):
        train.linen_apply(lambda x: x)
    with pytest.raises(TypeError, match=r"nnx_apply: graphdef must be an nnx.GraphDef"):
        train.nnx_apply(MLP())
    with pytest.raises(TypeError, match=r"make_eval_step: apply_fn must be callable"):
        train.make_eval_step(None)


def test_init_refuses_params_that_are_not_float():
    params = MLP().init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    ints = dict(params, Dense_1=dict(params["Dense_1"], bias=jnp.arange(CLASSES)))
    with pytest.raises(
        TypeError,
        match=r"init_train_state: params leaf 'Dense_1/bias' \(4,\) int32 is not floating point",
    ):
        train.init_train_state(ints, optax.sgd(0.1), key=jax.random.key(0))

    class Counted(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones((2, 3)))
            self.seen = nnx.Param(jnp.zeros((), jnp.int32))
            self.calls = nnx.BatchStat(jnp.zeros((), jnp.int32))

    _, nnx_params, rest = nnx.split(Counted(), nnx.Param, ...)
    with pytest.raises(TypeError, match=r"params leaf 'seen' \(\) int32 is not floating point"):
        train.init_train_state(nnx_params, optax.sgd(0.1), key=jax.random.key(0))
    # Integer variables that are not trained belong in model_state, and are fine there.
    _, floats, rest = nnx.split(Counted(), nnx.All(nnx.Param, lambda path, v: path[-1] == "w"), ...)
    state = train.init_train_state(floats, optax.sgd(0.1), key=jax.random.key(0), model_state=rest)
    assert {leaf.dtype for leaf in jax.tree.leaves(state.model_state)} == {jnp.dtype(jnp.int32)}


def _adam_setup():
    module = MLP()
    params = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    tx = optax.adam(1e-3)
    step = train.make_train_step(train.linen_apply(module), tx, donate=False)
    return step, train.init_train_state(params, tx, key=jax.random.key(0)), tx


def test_params_and_optimizer_state_must_match():
    step, state, tx = _adam_setup()
    batch = make_data(BATCH, 0)
    scaled = state._replace(params=jax.tree.map(lambda x: 0.5 * x, state.params))
    step(scaled, batch)  # same paths, shapes and dtypes: fine
    renamed = dict(state.params)
    renamed["Dense_9"] = renamed.pop("Dense_1")
    with pytest.raises(
        ValueError,
        match=r"make_train_step: state.opt_state does not match state.params: tx.init\(params\) "
        r"has leaf '0/mu/Dense_9/bias' \(4,\) float32 where state.opt_state has leaf "
        r"'0/mu/Dense_1/bias' \(4,\) float32 \(params leaf 'Dense_9/bias' \(4,\) float32\); "
        r"make the state with init_train_state",
    ):
        step(state._replace(params=renamed), batch)
    wider = MLP().init(jax.random.key(1), jnp.zeros((1, 8, 8, 2)))["params"]
    with pytest.raises(
        ValueError,
        match=r"has leaf '0/mu/Dense_0/kernel' \(128, 32\) float32 where state.opt_state has "
        r"leaf '0/mu/Dense_0/kernel' \(64, 32\) float32 \(params leaf 'Dense_0/kernel'",
    ):
        step(state._replace(params=wider), batch)
    halves = jax.tree.map(lambda x: x.astype(jnp.bfloat16), state.params)
    with pytest.raises(
        ValueError, match=r"where state.opt_state has leaf '0/mu/Dense_0/bias' \(32,\) bfloat16"
    ):
        step(state._replace(opt_state=tx.init(halves)), batch)  # made on other params
    sgd_state = train.init_train_state(state.params, optax.sgd(0.1), key=jax.random.key(0))
    with pytest.raises(
        ValueError, match=r"has leaf '0/count' \(\) int32 where state.opt_state has no leaf"
    ):
        step(sgd_state, batch)  # made for another tx


# ----------------------------------------------------------------------------------------------
# Learned transform state: LSQ step sizes train with the step's optimizer.


def test_lsq_step_sizes_train_in_the_step_as_a_hand_written_loop_would():
    module = MLP()
    params = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    transform = mixjax.chain(prune.magnitude(0.5), quant.lsq(4))
    tx = optax.sgd(0.5)
    state = train.init_train_state(params, tx, transform=transform, key=jax.random.key(1))
    learned = mixjax.learned_state(state.transform_state)
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(
        tx.init((state.params, learned))
    )
    step = train.make_train_step(train.linen_apply(module), tx, transform=transform, donate=False)
    batch = make_data(BATCH, 0)

    def loss(p, learn):
        view = transform.apply(p, mixjax.with_learned_state(state.transform_state, learn))
        logits = module.apply({"params": view}, batch["image"])
        return train.softmax_cross_entropy(logits, batch["label"]).mean()

    g_params, g_learned = jax.grad(loss, argnums=(0, 1))(state.params, learned)
    new, metrics = step(state, batch)
    np.testing.assert_allclose(metrics["loss"], loss(state.params, learned), rtol=1e-6)
    want = jax.tree.map(lambda s, g: s - 0.5 * g, learned, g_learned)
    got = mixjax.learned_state(new.transform_state)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    want_params = transform.constrain(
        jax.tree.map(lambda p, g: p - 0.5 * g, state.params, g_params), new.transform_state
    )
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(want_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for _ in range(19):
        new, _ = step(new, batch)
    moved = [
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(
            jax.tree.leaves(mixjax.learned_state(new.transform_state)),
            jax.tree.leaves(learned),
            strict=True,
        )
    ]
    assert min(moved) > 1e-4, moved  # every step size trained (was exactly 0.0 before)


# ----------------------------------------------------------------------------------------------
# Model variables and RNG streams: linen streams, a deterministic eval, NNX rngs, QAT state.


class NoisyDropNet(nn.Module):
    """Dropout as a config field (``deterministic``), plus a second RNG stream ``"noise"``."""

    deterministic: bool = False

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32)(x.reshape((x.shape[0], -1))))
        x = nn.Dropout(0.5, deterministic=self.deterministic)(x)
        if not self.deterministic:
            x = x + 0.1 * jax.random.normal(self.make_rng("noise"), x.shape)
        return nn.Dense(CLASSES)(x)


def _same_trees(a, b):
    return all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_linen_rng_streams_and_a_deterministic_eval_module():
    module = NoisyDropNet()
    params = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    eval_module = module.clone(deterministic=True)
    apply_fn = train.linen_apply(module, rng_streams=("dropout", "noise"), eval_module=eval_module)
    images = jnp.asarray(make_data(BATCH, 0)["image"])
    key = jax.random.key(5)
    # Each stream its own key, fold_in(key, crc32(name)): stream_keys.
    keys = train.stream_keys(key, ("dropout", "noise"))
    logits, _ = apply_fn(params, {}, images, train=True, key=key)
    np.testing.assert_allclose(
        logits, module.apply({"params": params}, images, rngs=keys), rtol=1e-6
    )
    assert not _same_trees(jax.random.key_data(keys["dropout"]), jax.random.key_data(keys["noise"]))
    tx = optax.adam(1e-3)
    step = train.make_train_step(apply_fn, tx, donate=False)
    evaluate = train.make_eval_step(apply_fn)
    batch = make_data(BATCH, 1)

    def init(seed):
        return train.init_train_state(params, tx, key=jax.random.key(seed))

    (a, ma), (b, mb), (c, mc) = (step(init(seed), batch) for seed in (1, 1, 2))
    assert _same_trees(a.params, b.params) and float(ma["loss"]) == float(mb["loss"])
    assert not _same_trees(a.params, c.params) and float(ma["loss"]) != float(mc["loss"])
    # Eval runs eval_module: no dropout, no noise, whatever the state's key.
    want = optax.softmax_cross_entropy_with_integer_labels(
        eval_module.apply({"params": a.params}, batch["image"]), batch["label"]
    ).mean()
    for state in (a, a._replace(rng=jax.random.key(9))):
        np.testing.assert_allclose(evaluate(state, batch)["loss"], want, rtol=1e-5)


class RngsNet(nnx.Module):
    """An NNX model whose ``__call__`` takes ``rngs`` (its dropout holds no stream)."""

    def __init__(self, rngs):
        self.Dense_0 = nnx.Linear(64, 32, rngs=rngs)
        self.norm = nnx.BatchNorm(32, rngs=rngs)
        self.drop = nnx.Dropout(0.5)
        self.Dense_1 = nnx.Linear(32, CLASSES, rngs=rngs)

    def __call__(self, x, *, rngs):
        x = nnx.relu(self.norm(self.Dense_0(x.reshape((x.shape[0], -1)))))
        return self.Dense_1(self.drop(x, rngs=rngs))


class DefaultStreamNet(nnx.Module):
    """Built with one seed: its dropout stream is tagged "default", not "dropout"."""

    def __init__(self, rngs):
        self.Dense_0 = nnx.Linear(64, 32, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.Dense_1 = nnx.Linear(32, CLASSES, rngs=rngs)

    def __call__(self, x):
        return self.Dense_1(self.drop(nnx.relu(self.Dense_0(x.reshape((x.shape[0], -1))))))


@pytest.mark.parametrize("net", ["rngs_kwarg", "default_stream"])
def test_nnx_dropout_follows_the_step_key_and_eval_is_deterministic(net):
    if net == "rngs_kwarg":
        model = RngsNet(nnx.Rngs(0))
        apply_fn = train.nnx_apply(nnx.graphdef(model), rngs_kwarg="rngs")
    else:
        model = DefaultStreamNet(nnx.Rngs(0))
        assert model.drop.rngs.key.tag == "default"
        apply_fn = train.nnx_apply(nnx.graphdef(model))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.sgd(0.1)
    step = train.make_train_step(apply_fn, tx, donate=False)
    evaluate = train.make_eval_step(apply_fn)
    batch = make_data(BATCH, 2)

    def init(seed):
        return train.init_train_state(params, tx, key=jax.random.key(seed), model_state=rest)

    (a, ma), (b, mb), (c, mc) = (step(init(seed), batch) for seed in (1, 1, 2))
    assert _same_trees(a.params, b.params) and float(ma["loss"]) == float(mb["loss"])
    assert not _same_trees(a.params, c.params) and float(ma["loss"]) != float(mc["loss"])
    assert jax.tree.structure(a.model_state) == jax.tree.structure(rest)
    # Eval: the model in eval() mode (dropout off, running statistics), whatever the key.
    model = nnx.merge(graphdef, a.params, a.model_state)
    model.eval()
    kwargs = {"rngs": nnx.Rngs(0)} if net == "rngs_kwarg" else {}
    want = optax.softmax_cross_entropy_with_integer_labels(
        model(jnp.asarray(batch["image"]), **kwargs), batch["label"]
    ).mean()
    for state in (a, a._replace(rng=jax.random.key(9))):
        np.testing.assert_allclose(evaluate(state, batch)["loss"], want, rtol=1e-5)


def test_nnx_reseed_of_a_default_stream():
    """What nnx_apply works around: reseeding "dropout" leaves a "default" stream alone."""
    model = DefaultStreamNet(nnx.Rngs(0))
    x = jnp.ones((1, 64))
    draws = []
    for seed in (1, 2):
        nnx.reseed(model, dropout=seed)
        draws.append(model(x))
    assert not np.allclose(draws[0], draws[1])  # the counter moved on, not the key
    nnx.reseed(model, dropout=1)
    again = model(x)
    assert not np.allclose(again, draws[0])  # so the same key does not repeat a draw
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    apply_fn = train.nnx_apply(graphdef)
    outs = [apply_fn(params, rest, x, train=True, key=jax.random.key(s))[0] for s in (1, 1, 2)]
    np.testing.assert_array_equal(outs[0], outs[1])
    assert not np.allclose(outs[0], outs[2])


def _docstring_example(obj):
    """The indented code block after the ``::`` in ``obj``'s docstring."""
    doc = textwrap.dedent("\n".join(obj.__doc__.split("\n")[1:]))
    block = doc.split("::\n", 1)[1]
    lines = []
    for line in block.split("\n"):
        if line and not line.startswith(" "):
            break
        lines.append(line)
    return textwrap.dedent("\n".join(lines))


class NormNet(nn.Module):
    """BatchNorm and dropout switched by a ``train`` keyword that defaults to ``False`` (as the
    reference models' are)."""

    @nn.compact
    def __call__(self, x, *, train=False):
        return NormDropNet()(x, train)


def test_activation_quant_adapter_keeps_batch_stats():
    """The ApplyFn docstring's adapter, run as written: observers and batch statistics in one
    model state, both updated by the step."""
    module = NormNet()
    images = jnp.asarray(make_data(BATCH, 0)["image"])
    scope = {"mixjax": mixjax, "module": module, "key": jax.random.key(0), "x": images}
    exec(_docstring_example(train.ApplyFn), scope)
    apply_fn, params, model_state = scope["apply_fn"], scope["params"], scope["model_state"]
    act, variables = scope["act"], scope["variables"]
    assert sorted(model_state) == ["act", "model"]
    assert sorted(model_state["model"]) == ["batch_stats"]

    tx = optax.sgd(0.1)
    state = train.init_train_state(params, tx, key=jax.random.key(0), model_state=model_state)
    new, _ = train.make_train_step(apply_fn, tx, steps_per_call=2)(state, stacked(2, 0))
    assert jax.tree.structure(new.model_state) == jax.tree.structure(model_state)
    for observed in new.model_state["act"].values():
        assert int(observed.count) == 2 and float(observed.max) > float(observed.min)
    stats = new.model_state["model"]["batch_stats"]["NormDropNet_0"]["BatchNorm_0"]
    old = variables["batch_stats"]["NormDropNet_0"]["BatchNorm_0"]
    assert not np.allclose(stats["mean"], old["mean"])
    batch = make_data(BATCH, 5)

    @jax.jit
    def expected_loss(params, model_state, images, labels):
        fn = lambda p, x: module.apply({"params": p, **model_state["model"]}, x, train=False)
        logits, _ = act.apply(fn, model_state["act"], params, images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    expected = expected_loss(new.params, new.model_state, batch["image"], batch["label"])
    np.testing.assert_allclose(train.make_eval_step(apply_fn)(new, batch)["loss"], expected, 1e-5)


def test_image_batch_with_per_example_weights():
    step, state = tiny_setup()
    batch = make_data(BATCH, 0)
    weight = np.zeros(BATCH, np.float32)
    weight[:5] = 1.0
    _, weighted = step(state, dict(batch, weight=weight))
    _, first_five = step(state, {k: v[:5] for k, v in batch.items()})
    np.testing.assert_allclose(weighted["loss"], first_five["loss"], rtol=1e-6)
    np.testing.assert_allclose(weighted["accuracy"], first_five["accuracy"], rtol=1e-6)
    assert sorted(weighted) == ["accuracy", "loss"]
    evaluate = train.make_eval_step(train.linen_apply(MLP()))
    np.testing.assert_allclose(
        evaluate(state, dict(batch, weight=weight > 0))["loss"],
        evaluate(state, {k: v[:5] for k, v in batch.items()})["loss"],
        rtol=1e-6,
    )


def test_bad_rng_and_eval_arguments():
    with pytest.raises(TypeError, match=r"linen_apply: rng_streams must be a tuple of stream"):
        train.linen_apply(MLP(), rng_streams="dropout")
    with pytest.raises(TypeError, match=r"nnx_apply: rng_streams must be a tuple of non-empty"):
        train.nnx_apply(nnx.graphdef(RngsNet(nnx.Rngs(0))), rng_streams=("dropout", 3))
    with pytest.raises(ValueError, match=r"linen_apply: rng_streams must not repeat a name"):
        train.linen_apply(MLP(), rng_streams=("dropout", "dropout"))
    with pytest.raises(TypeError, match=r"linen_apply: eval_module must be None or a linen Mod"):
        train.linen_apply(MLP(), eval_module=lambda x: x)
    with pytest.raises(TypeError, match=r"linen_apply: train_kwarg must be None or a keyword"):
        train.linen_apply(MLP(), train_kwarg=1)
    with pytest.raises(
        TypeError,
        match=r"nnx_apply: RngsNet.__call__ requires an 'rngs' argument; pass rngs_kwarg='rngs'",
    ):
        train.nnx_apply(nnx.graphdef(RngsNet(nnx.Rngs(0))))
    with pytest.raises(TypeError, match=r"nnx_apply: rngs_kwarg must be None or a keyword name"):
        train.nnx_apply(nnx.graphdef(RngsNet(nnx.Rngs(0))), rngs_kwarg="not a name")
