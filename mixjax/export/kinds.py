"""The table of record kinds: how each leaf of an artifact is encoded and how any record decodes.

Everything about kinds is declared here, in static tables, so decoding never depends on what
happened to be imported:

* :data:`DECODERS`: every kind (``"array"``, ``"int"``, ``"codebook"``, ``"sparse"``) and its
  decoder ``decoder(record, arrays) -> np.ndarray``;
* :data:`ENCODERS`: the transform-state types whose leaves are stored on an integer grid
  (:class:`mixjax.quant.FakeQuantState`, :class:`mixjax.quant.LsqState`), each with the mirror
  tree of ``"int"`` encoders it gives (:func:`leaf_encoders`);
* :data:`CANDIDATES`: the encodings tried on every leaf besides its own (the codebook and sparse
  kinds of :mod:`mixjax.export.codebook`); :func:`encode_leaf` keeps the smallest record.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from mixjax.export import codebook, records
from mixjax.export.records import ARRAY_OVERHEAD, LeafEncoder, Record, Store
from mixjax.quant.learned import LsqState
from mixjax.quant.weights import FakeQuantState

__all__ = ["CANDIDATES", "DECODERS", "ENCODERS", "decode", "encode_leaf", "leaf_encoders"]

Decoder = Callable[[Record, Mapping[str, np.ndarray]], np.ndarray]
# A candidate encoding: (path, leaf, the leaf's covering encoder or None, store) -> record, or
# None where it does not apply.
Candidate = Callable[[str, np.ndarray, LeafEncoder | None, Store], Record | None]

DECODERS: dict[str, Decoder] = {
    **records.PLAIN_KINDS,
    "codebook": codebook.decode_codebook,
    "sparse": codebook.decode_sparse,
}
CANDIDATES: tuple[Candidate, ...] = (codebook.encode_codebook, codebook.encode_sparse)


def _fake_quant_encoders(state: FakeQuantState, fn_name: str) -> Any:
    nothing = jax.tree.map(lambda _: None, state.scale, is_leaf=lambda x: x is None)
    factors = nothing if state.input_scale is None else state.input_scale
    return jax.tree.map(
        lambda s, z, a: None if s is None else records.int_encoder(s, z, a, fn_name=fn_name),
        state.scale,
        state.zero_point,
        factors,
        is_leaf=lambda x: x is None,
    )


def _lsq_encoders(state: LsqState, fn_name: str) -> Any:
    return jax.tree.map(lambda s: records.int_encoder(s, fn_name=fn_name), state.scale)


ENCODERS: dict[type, Callable[[Any, str], Any]] = {
    FakeQuantState: _fake_quant_encoders,
    LsqState: _lsq_encoders,
}


def decode(record: Record, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """Decodes one record of any kind to its array.

    Raises:
      ValueError: not a record, an unknown kind, or a record that does not decode.
    """
    return records.decode_with(DECODERS, record, arrays)


def encode_leaf(path: str, leaf: np.ndarray, encoder: LeafEncoder | None, store: Store) -> Record:
    """The smallest record of a leaf among its encoder's (``"array"`` if none) and candidates'.

    Size is the bytes of the record's arrays plus :data:`ARRAY_OVERHEAD` per array; ties keep
    the earlier option (the encoder's). Only the chosen record's arrays reach ``store``.

    Raises:
      ValueError: the encoder rejects the leaf (e.g. a view off its quantization grid).
    """
    options = []
    for i, fn in enumerate([encoder or records.encode_array, *CANDIDATES]):
        staged: dict[str, np.ndarray] = {}

        def stage(array, staged=staged):
            name = f"\0{len(staged)}"
            staged[name] = np.asarray(array)
            return name

        record = fn(path, leaf, stage) if i == 0 else fn(path, leaf, encoder, stage)
        if record is not None:
            size = sum(a.nbytes + ARRAY_OVERHEAD for a in staged.values())
            options.append((size, i, record, staged))
    _, _, record, staged = min(options, key=lambda o: o[:2])
    names = {name: store(array) for name, array in staged.items()}

    def rename(node):
        if isinstance(node, dict):
            return {k: rename(v) for k, v in node.items()}
        if isinstance(node, list):
            return [rename(v) for v in node]
        return names.get(node, node) if isinstance(node, str) else node

    return rename(record)


def leaf_encoders(params: Any, state: Any, fn_name: str) -> list[LeafEncoder | None]:
    """For each leaf of ``params`` (``jax.tree.leaves`` order), the encoder covering it, if any.

    Every state of a type in :data:`ENCODERS` inside ``state`` (e.g. the entries of a ``chain``
    state) covers its leaves; where several do, the last one wins (the last transform of the
    chain, whose grid the view is on). The encoders' errors name ``fn_name``.
    """
    treedef = jax.tree.structure(params)
    result: list[LeafEncoder | None] = [None] * treedef.num_leaves
    registered = lambda node: type(node) in ENCODERS
    for node in jax.tree.leaves(state, is_leaf=registered):
        if not registered(node):
            continue
        for i, encoder in enumerate(treedef.flatten_up_to(ENCODERS[type(node)](node, fn_name))):
            if encoder is not None:
                result[i] = encoder
    return result
