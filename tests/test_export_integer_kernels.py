"""Tests of integer_model(kernels=...): int8 or dequantized per site, chosen by measurement, and
the same results and the same artifact whichever way a site runs."""

import pathlib

import flax.linen as nn
import jax
import numpy as np
import pytest
from test_export_integer import CNN, MLP, check_close, data, pipeline

from mixjax import export
from mixjax.export import integer, integer_choice


def int32_matmuls(p, int_model, x):
    jaxpr = str(jax.make_jaxpr(p.run)(int_model, x))
    return jaxpr.count("preferred_element_type=int32")


@pytest.mark.parametrize("model", [MLP(), CNN()], ids=["mlp", "cnn"])
def test_every_way_matches_the_fake_quant_forward(model, tmp_path):
    x = data()
    p = pipeline(model, x)
    before = pathlib.Path(export.save(p.artifact, tmp_path / "before.mjx")).read_bytes()
    reference = p.fake(p.astate, x)
    ways = {}
    for kernels in integer.KERNELS:
        int_model = export.integer_model(
            p.fn, p.artifact, x, act=p.act, act_state=p.astate, kernels=kernels
        )
        ways[kernels] = [row.way for row in int_model.table]
        check_close(jax.jit(p.run)(int_model, x), reference)
        if kernels == "measure":
            assert all(row.why.startswith("measured: model ") for row in int_model.table)
            assert int32_matmuls(p, int_model, x) == ways[kernels].count(integer.INT8)
    assert set(ways["int8"]) == {integer.INT8}
    assert set(ways["dequantized"]) == {f"int8 {integer.DEQUANTIZED}"}
    assert set(ways["measure"]) <= set(ways["int8"]) | set(ways["dequantized"])
    # The choice is made at run time only: the artifact is what it was, byte for byte.
    assert pathlib.Path(export.save(p.artifact, tmp_path / "after.mjx")).read_bytes() == before


class Twins(nn.Module):
    """Two Dense layers of the same shapes, then one of other shapes."""

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(64)(x))
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(10)(x)


@pytest.mark.parametrize("int8_faster", [True, False])
def test_measure_keeps_int8_where_the_model_gets_faster_one_shape_group_at_a_time(
    monkeypatch, int8_faster
):
    x = data()
    p = pipeline(Twins(), x)
    calls = []

    def fake_times(fn, params, args, int_models, rounds):
        without, with_ = ([row.way for row in m.table] for m in int_models)
        calls.append((without, with_, rounds))
        return [0.002, 0.001] if int8_faster else [0.001, 0.002]

    monkeypatch.setattr(integer_choice, "time_models", fake_times)
    int_model = export.integer_model(
        p.fn, p.artifact, x, act=p.act, act_state=p.astate, kernels="measure", rounds=3
    )
    i8, deq = integer.INT8, f"int8 {integer.DEQUANTIZED}"
    # Dense_1 has Dense_0's shapes: one group, switched together; Dense_2 is its own group.
    if int8_faster:
        assert calls == [([deq] * 3, [i8, i8, deq], 3), ([i8, i8, deq], [i8] * 3, 3)]
    else:
        assert calls == [([deq] * 3, [i8, i8, deq], 3), ([deq] * 3, [deq, deq, i8], 3)]
    expected = i8 if int8_faster else deq
    assert [row.way for row in int_model.table] == [expected] * 3
    with_ms, without_ms = ("1.000", "2.000") if int8_faster else ("2.000", "1.000")
    assert int_model.table[0].why == (
        f"measured: model {with_ms} ms with int8 here, {without_ms} ms without"
    )
    assert int32_matmuls(p, int_model, x) == (3 if int8_faster else 0)
    check_close(jax.jit(p.run)(int_model, x), p.fake(p.astate, x))


def test_model_timer_gives_one_positive_time_per_model():
    x = data()
    p = pipeline(MLP(), x)
    models = [p.int_model(), p.int_model()]
    shapes = jax.ShapeDtypeStruct(x.shape, x.dtype)  # only shapes are needed
    seconds = integer_choice.time_models(p.fn, p.artifact.params(), (shapes,), models, 2)
    assert len(seconds) == 2 and all(np.isfinite(s) and s > 0 for s in seconds)


def test_bad_kernels_and_rounds():
    p, x = pipeline(MLP(), data()), data()
    with pytest.raises(ValueError, match=r"kernels must be one of \('measure', 'int8', 'deq"):
        export.integer_model(p.fn, p.artifact, x, act=p.act, act_state=p.astate, kernels="fast")
    with pytest.raises(ValueError, match="rounds"):
        export.integer_model(
            p.fn, p.artifact, x, act=p.act, act_state=p.astate, kernels="measure", rounds=0
        )
