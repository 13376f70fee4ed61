"""Weight clustering (weight sharing) as a :class:`~mixjax.core.ParamTransform`.

Each selected leaf (or each output channel, the last axis, with ``per_channel=True``) is reduced
to at most ``num_clusters`` distinct values by 1-D k-means (:mod:`mixjax.share.kmeans`). Two modes:

* ``mode="fixed"`` (Deep Compression, Han et al. 2016): assignments are fixed between
  re-clusterings and the centroids are trained. **Where the centroids live:** in the stored
  weights. A centroid is the mean of the stored weights of its members, so the view is
  ``centroids[assignments]`` with ``centroids = segment_mean(weights, assignments)`` (which, right
  after k-means, is exactly the k-means codebook). Through :func:`mixjax.share.tie`,
  ``jax.grad`` gives *every* member weight its centroid's gradient, the sum of the gradients of
  all members' view entries.
  Since the members of a cluster always receive the same gradient, any elementwise optax optimizer
  (SGD, momentum, Adam, decoupled weight decay, ...) moves them all by the same step, so their
  mean, the centroid, takes exactly the step a directly trained centroid would: a normal optax
  loop over ``params`` trains the centroids, nothing else is needed. (Global-norm clipping sees
  each centroid's gradient once per member.) The stored weights keep their individual offsets
  from the mean; the view never shows them.
* ``mode="reassign"`` (TFMOT): the centroids live in the state; every forward assigns each weight
  to its nearest centroid, with a straight-through gradient to the stored weight. Centroids are
  refreshed by k-means when the transform re-clusters (``update_every``), and stay put without.

Training recipe (either mode)::

    transform = mixjax.share.cluster(16)
    state = transform.init(params)
    loss_of = lambda p: loss(model.apply({"params": transform.apply(p, state)}, x), y)
    grads = jax.grad(loss_of)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    state = transform.update(params, state, step)   # re-clusters every `update_every` steps

``preserve_sparsity=True`` keeps zeros: k-means runs on the nonzero weights only with
``num_clusters - 1`` centroids, zero is the pinned remaining value that never moves, and every
weight that is zero in the input view (e.g. pruned by a transform chained before this one) is
exactly zero in the output view. Zero counts among the ``num_clusters`` values, also in leaves
that have no zeros (pass ``preserve_sparsity=False`` for dense layers to use all of them); that
keeps at most ``num_clusters`` values per leaf even when pruning zeroes more weights later.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mixjax import _checks, select
from mixjax import layout as layout_lib
from mixjax.core import Params, ParamTransform, multiples_of, never, update_when_due
from mixjax.layout import Layout
from mixjax.quant.weights import scale_shape
from mixjax.share import kmeans
from mixjax.share.tying import straight_through, tie

__all__ = ["MODES", "ClusterState", "cluster"]

MODES = ("fixed", "reassign")


class ClusterState(NamedTuple):
    """State of :func:`cluster`: two mirror trees (params' structure, ``None`` where unclustered).

    With ``K = num_clusters`` and ``F`` free centroids (``K - 1`` with ``preserve_sparsity``, else
    ``K``):

    Attributes:
      assignments: ``mode="fixed"``: array of the leaf's shape (uint8 when ``K <= 256``, else
        int32), each weight's cluster in ``[0, F)``; with ``preserve_sparsity``, weights that
        were zero when clustered hold ``F``, the pinned zero. ``None`` at every leaf in
        ``mode="reassign"``.
      centroids: ``mode="reassign"``: float32, ``(F,)`` per leaf or ``(C, F)`` per output channel
        (``C`` = last axis), ascending. ``None`` at every leaf in ``mode="fixed"``, whose
        centroids are the member means of the stored weights.
    """

    assignments: Params
    centroids: Params


def _to_groups(x: jax.Array, per_channel: bool, layout: Layout | None = None) -> jax.Array:
    """Leaf -> ``(C, n)`` per output feature (the last axis, or the layout's output axes), or
    ``(1, size)``."""
    if per_channel:
        view = x if layout is None else layout_lib.to_matrix(x, layout)
        return view.reshape(-1, view.shape[-1]).T
    return x.reshape(1, -1)


def _groups_shape(
    shape: tuple[int, ...], per_channel: bool, layout: Layout | None = None
) -> tuple[int, int]:
    """The shape :func:`_to_groups` gives a leaf of ``shape``: ``(features, weights each)``."""
    size = int(np.prod(shape, dtype=np.int64))
    if not per_channel:
        return 1, size
    features = layout_lib.matrix_shape(shape, layout)[-1] if layout is not None else shape[-1]
    return features, size // features


def _from_groups(
    groups: jax.Array, shape: tuple[int, ...], per_channel: bool, layout: Layout | None = None
) -> jax.Array:
    if not per_channel:
        return groups.reshape(shape)
    if layout is None:
        return groups.T.reshape(shape)
    view = groups.T.reshape(layout_lib.matrix_shape(shape, layout))
    return layout_lib.from_matrix(view, layout, shape)


def _live(x: jax.Array, preserve_sparsity: bool) -> jax.Array:
    return x != 0 if preserve_sparsity else jnp.ones(x.shape, bool)


# Module-level jits: one program per leaf shape and configuration, shared by all transforms,
# also when ``apply`` runs eagerly.
# Non-finite weights (which eager ``init``/``update`` refuse, but a traced one cannot) take no
# part in a fit or a cluster mean and pass through both views unchanged: NaN/Inf stays where the
# input holds it and does not spread to the cluster.
@functools.partial(jax.jit, static_argnames=("free", "per_channel", "preserve_sparsity", "layout"))
def _fixed_view(x, assignments, free, per_channel, preserve_sparsity, layout=None):
    # The output feature (group) of every weight, in the leaf's own layout.
    shape = _groups_shape(x.shape, per_channel, layout)
    feature = jnp.broadcast_to(jnp.arange(shape[0], dtype=jnp.int32)[:, None], shape)
    feature = _from_groups(feature, x.shape, per_channel, layout)
    assignments = assignments.astype(jnp.int32)
    ids = feature * free + jnp.minimum(assignments, free - 1)
    finite = jnp.isfinite(x)
    live = _live(x, preserve_sparsity) & (assignments < free) & finite
    return jnp.where(finite, tie(x, ids, live, shape[0] * free), x)


@functools.partial(jax.jit, static_argnames=("per_channel", "preserve_sparsity", "layout"))
def _reassign_view(x, centroids, per_channel, preserve_sparsity, layout=None):
    groups = _to_groups(x.astype(jnp.float32), per_channel, layout)
    centroids = centroids if per_channel else centroids[None]
    codes = kmeans.assign(groups, centroids)
    q = jnp.take_along_axis(centroids, codes, axis=-1)
    q = _from_groups(q, x.shape, per_channel, layout)
    q = jnp.where(_live(x, preserve_sparsity), q, 0.0)
    return jnp.where(jnp.isfinite(x), straight_through(x, q), x)


class _Clustering(NamedTuple):
    """The static configuration of a clustering transform (see :func:`cluster`)."""

    free: int  # centroids k-means fits: num_clusters, less the pinned zero
    per_channel: bool
    preserve_sparsity: bool
    init: str
    max_iterations: int
    bins: int
    fixed: bool  # mode == "fixed"
    index_dtype: type


def _fit_leaves(c: _Clustering, key, leaves, layouts):
    """``(centroids, assignments)`` of each leaf; same-size groups of all leaves fit at once."""
    # float32 before fitting (as the fit computes anyway): one program for every leaf dtype.
    pairs = list(zip(leaves, layouts, strict=True))
    groups = [_to_groups(x.astype(jnp.float32), c.per_channel, lay) for x, lay in pairs]
    masks = [_to_groups(_live(x, c.preserve_sparsity), c.per_channel, lay) for x, lay in pairs]
    fitted = [m & jnp.isfinite(g) for m, g in zip(masks, groups, strict=True)]
    by_size: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        by_size.setdefault(g.shape[1], []).append(i)
    results = [None] * len(leaves)
    for size, members in by_size.items():
        bucket_key = None if key is None else jax.random.fold_in(key, size)
        fit = kmeans.fit(
            bucket_key,
            jnp.concatenate([groups[i] for i in members]),
            c.free,
            init=c.init,
            mask=jnp.concatenate([fitted[i] for i in members]),
            max_iterations=c.max_iterations,
            bins=c.bins,
        )
        offsets = np.cumsum([0] + [groups[i].shape[0] for i in members])
        for j, i in enumerate(members):
            lo, hi = offsets[j], offsets[j + 1]
            assignments = jnp.where(~masks[i], c.free, fit.assignments[lo:hi])
            assignments = _from_groups(
                assignments.astype(c.index_dtype), leaves[i].shape, c.per_channel, layouts[i]
            )
            centroids = fit.centroids[lo:hi] if c.per_channel else fit.centroids[lo]
            results[i] = (centroids, assignments)
    return results


def _cluster_tree(c: _Clustering, key, params, chosen, layouts) -> ClusterState:
    flat, treedef = jax.tree_util.tree_flatten(params)
    hits = jax.tree_util.tree_leaves(chosen)
    picked = [i for i, hit in enumerate(hits) if hit]
    results = iter(_fit_leaves(c, key, [flat[i] for i in picked], [layouts[i] for i in picked]))
    assignments, centroids = [], []
    for hit in hits:
        cents, assigned = next(results) if hit else (None, None)
        assignments.append(assigned if c.fixed else None)
        centroids.append(None if c.fixed else cents)
    return ClusterState(treedef.unflatten(assignments), treedef.unflatten(centroids))


def _view(c: _Clustering, params, state: ClusterState, layouts):
    flat, treedef = jax.tree_util.tree_flatten(params)
    fields = treedef.flatten_up_to(state.assignments if c.fixed else state.centroids)
    view = c.per_channel, c.preserve_sparsity
    out = [
        x
        if f is None
        else _fixed_view(x, f, c.free, *view, layout)
        if c.fixed
        else _reassign_view(x, f, *view, layout)
        for x, f, layout in zip(flat, fields, layouts, strict=True)
    ]
    return treedef.unflatten(out)


def cluster(
    num_clusters: int = 16,
    *,
    init: str = "optimal",
    per_channel: bool = False,
    mode: str = "fixed",
    preserve_sparsity: bool = True,
    update_every: int | None = None,
    max_iterations: int = kmeans.DEFAULT_MAX_ITERATIONS,
    bins: int = kmeans.DEFAULT_BINS,
    key: jax.Array | None = None,
    where: select.Where = None,
    layouts: Any = None,
) -> ParamTransform:
    """Weight clustering: at most ``num_clusters`` distinct values per leaf (or output channel).

    See the module docstring for the two modes, where trained centroids live, and the recipe.

    Args:
      num_clusters: ``K >= 2``, the number of distinct values per leaf / channel (zero included
        when ``preserve_sparsity``); at most the number of weights per leaf / channel.
      init: centroid initialization, one of :data:`mixjax.share.kmeans.INITS`.
      per_channel: cluster each output channel (last axis of the kernel, or with ``layouts``
        each output feature over all its output axes) separately.
      mode: ``"fixed"`` (Deep Compression: fixed assignments, trained centroids) or
        ``"reassign"`` (TFMOT: nearest centroid at every forward, straight-through gradient).
      preserve_sparsity: keep zeros of the input view exactly zero; zero is a pinned centroid.
      update_every: re-cluster (k-means from ``init`` on the current input weights) at the
        steps ``t`` with ``t % update_every == 0`` (:func:`mixjax.multiples_of`), inside
        ``jit`` via ``lax.cond``; ``None``: cluster once, at ``init``.
      max_iterations: cap on Lloyd iterations (:func:`mixjax.share.kmeans.fit`).
      bins: histogram size above which k-means runs on a histogram
        (:func:`mixjax.share.kmeans.fit`).
      key: ``jax.random`` key, required by ``init="kmeans++"`` and ``"random"``; each leaf and
        each re-clustering step get a key folded from it.
      where: which leaves to cluster (:mod:`mixjax.select`; default: float kernels, ndim >= 2;
        with ``layouts``: the kernels a matmul or convolution consumes, not embedding tables).
      layouts: the params' layouts (:func:`mixjax.layout.learn`), which say where each kernel's
        output features are (used with ``per_channel``).

    Returns:
      A :class:`~mixjax.ParamTransform` whose state is a :class:`ClusterState`. Its ``shares``
      (:attr:`mixjax.ParamTransform.shares`) names each clustered leaf with its groups' block
      shape: ``()`` per leaf, ``(1, ..., 1, C)`` (the output axes kept) per channel; so a
      quantizer after it in :func:`mixjax.chain` scales each group with one scale and keeps its
      at most ``num_clusters`` values (:mod:`mixjax.quant.weights`).

    Raises:
      TypeError / ValueError: ``num_clusters < 2``, unknown ``init`` or ``mode``, a random
        ``init`` without ``key``, bad ``update_every``/``max_iterations``/``bins``; at
        ``init`` (and at each re-clustering ``update``): a leaf or channel with fewer weights
        than ``num_clusters``, a selected leaf that is not floating point, a selected leaf
        holding NaN/Inf. The last is checked where the weights are concrete, not under
        ``jax.jit``: there non-finite weights are left out of the k-means fit and of the
        cluster means, and pass through the view unchanged, so NaN/Inf stays where the input
        holds it instead of spreading to its cluster.
    """
    name = "mixjax.share.cluster"
    k = _checks.integer(name, "num_clusters", num_clusters, 2)
    _checks.choice(name, "init", init, kmeans.INITS)
    _checks.choice(name, "mode", mode, MODES)
    if init in kmeans.RANDOM_INITS and key is None:
        raise ValueError(f"{name}: init={init!r} is random and needs key=jax.random.key(...)")
    if key is not None:
        _checks.key(name, "key", key)
    update_every = _checks.integer(name, "update_every", update_every, 1, optional=True)
    c = _Clustering(
        free=k - 1 if preserve_sparsity else k,
        per_channel=_checks.boolean(name, "per_channel", per_channel),
        preserve_sparsity=_checks.boolean(name, "preserve_sparsity", preserve_sparsity),
        init=init,
        max_iterations=_checks.integer(name, "max_iterations", max_iterations, 0),
        bins=_checks.integer(name, "bins", bins, 2),
        fixed=mode == "fixed",
        index_dtype=jnp.uint8 if k <= 256 else jnp.int32,
    )
    due = never if update_every is None else multiples_of(update_every)

    def check_leaf(path, leaf, found):
        layout = None if found is None else found[path]
        if per_channel and found is not None and layout is None:
            raise ValueError(
                f"{name}: {select.describe(path, leaf)} is selected by where= but no matmul, "
                "convolution or table lookup consumes it, so it has no output features for "
                "per_channel=True"
            )
        per_group = _groups_shape(leaf.shape, per_channel and leaf.ndim > 0, layout)[1]
        if per_group < k:
            unit = "output channel" if per_channel else "leaf"
            raise ValueError(
                f"{name}: {select.describe(path, leaf)}: num_clusters={k} exceeds the "
                f"{per_group} weights per {unit}"
            )
        if not isinstance(leaf, jax.core.Tracer):  # under jit: see the note above _fixed_view
            bad = int(jnp.sum(~jnp.isfinite(leaf)))
            if bad:
                raise ValueError(
                    f"{name}: {select.describe(path, leaf)} holds {bad} non-finite values "
                    "(NaN/Inf); k-means needs finite weights"
                )

    def flat(params):
        found = layout_lib.by_path(name, params, layouts)
        paths = [p for p, _ in select.leaves_with_paths(params)]
        return found, [None if found is None or not per_channel else found[p] for p in paths]

    def selected(params):
        found, _ = flat(params)
        default = where
        if found is not None and where is None:
            default = lambda p, leaf: (  # noqa: E731
                select.is_floating(leaf) and getattr(found[p], "kind", None) in ("dense", "conv")
            )
        chosen = select.selection(name, params, default)
        select.mirror(lambda p, leaf: check_leaf(p, leaf, found), params, chosen)
        return chosen

    def apply_fn(params, state):
        _checks.instance(name, "state", state, ClusterState, "a ClusterState")
        if c.fixed:
            select.check_mirror_shapes(name, params, state.assignments, "assignments")
        else:
            select.check_mirror(name, params, state.centroids, "centroids")
        return _view(c, params, state, flat(params)[1])

    def update_fn(params, state, step, **extra):
        del extra
        step_key = None if key is None else jax.random.fold_in(key, step)
        refresh = lambda: _cluster_tree(c, step_key, params, selected(params), flat(params)[1])
        return update_when_due(due, step, refresh, state)

    def shares_fn(params, state):
        fields = jax.tree.structure(params).flatten_up_to(
            state.assignments if c.fixed else state.centroids
        )
        leaves = zip(select.leaves_with_paths(params), fields, flat(params)[1], strict=True)
        # A cluster's members are the weights of one group: those of a per-channel scale.
        return {
            path: scale_shape(leaf, c.per_channel, layout)
            for (path, leaf), field, layout in leaves
            if field is not None
        }

    return ParamTransform(
        lambda params: _cluster_tree(c, key, params, selected(params), flat(params)[1]),
        apply_fn,
        update_fn,
        due=due,
        shares=shares_fn,
    )
