"""Quantization: integer grids, weight fake-quantization (QAT, LSQ), activations and PTQ.

* :mod:`~mixjax.quant.grids`: :class:`Grid`, scales and zero points (:func:`qparams`), the
  straight-through op :func:`fake_quantize` and the exact maps :func:`quantize` /
  :func:`dequantize` shared with :mod:`mixjax.export`;
* :mod:`~mixjax.quant.weights`: :func:`fake_quant`, weights with scales from their range;
* :mod:`~mixjax.quant.learned`: :func:`lsq`, weights with learned step sizes;
* :mod:`~mixjax.quant.activations`: :func:`activation_quant`, layer inputs of any linen model
  (and NNX, through :func:`instrument`) with observed ranges;
* :mod:`~mixjax.quant.observers`: min/max, EMA and percentile range observers;
* :mod:`~mixjax.quant.ptq`: :func:`calibrate`, post-training activation ranges.
"""

from mixjax.quant.activations import OUTPUT, ActivationQuant, activation_quant, instrument
from mixjax.quant.grids import (
    Grid,
    dequantize,
    fake_quantize,
    grid,
    qparams,
    quantize,
    quantize_dequantize,
)
from mixjax.quant.learned import LsqState, lsq
from mixjax.quant.observers import (
    Observer,
    ObserverState,
    ema_observer,
    minmax_observer,
    percentile_observer,
)
from mixjax.quant.ptq import calibrate
from mixjax.quant.weights import FakeQuantState, fake_quant

__all__ = [
    "OUTPUT",
    "ActivationQuant",
    "FakeQuantState",
    "Grid",
    "LsqState",
    "Observer",
    "ObserverState",
    "activation_quant",
    "calibrate",
    "dequantize",
    "ema_observer",
    "fake_quant",
    "fake_quantize",
    "grid",
    "instrument",
    "lsq",
    "minmax_observer",
    "percentile_observer",
    "qparams",
    "quantize",
    "quantize_dequantize",
]
