"""Quantization: integer grids, weight fake-quantization (QAT, LSQ), activations and PTQ.

* :mod:`~mixjax.quant.grids`: :class:`Grid`, scales and zero points (:func:`qparams`), the
  straight-through op :func:`fake_quantize`, the exact maps :func:`quantize` /
  :func:`dequantize` shared with :mod:`mixjax.export`, and :func:`expand_scale` for compact
  (group-wise) scales;
* :mod:`~mixjax.quant.weights`: :func:`fake_quant`, weights with scales from their range (per
  tensor, per output feature or group-wise; following the shared values of a clustering before
  it in a chain);
* :mod:`~mixjax.quant.learned`: :func:`lsq`, weights with learned step sizes;
* :mod:`~mixjax.quant.activations`: :func:`activation_quant`, the inputs of every matmul and
  convolution of a model's parameters (linen or NNX) with observed ranges, and
  :func:`quantized_apply` for the training step;
* :mod:`~mixjax.quant.observers`: min/max, EMA and percentile range observers;
* :mod:`~mixjax.quant.ptq`: :func:`calibrate`, post-training activation ranges;
* :mod:`~mixjax.quant.layerwise`: one-shot weight quantization from calibration data,
  :func:`gptq` (second order, GPTQ) and :func:`rtn` (round to nearest), methods for
  :func:`mixjax.oneshot.compress`, and their per-layer solvers :func:`gptq_solve` /
  :func:`rtn_solve`;
* :mod:`~mixjax.quant.activation_aware`: :func:`awq` (activation-aware scales per input
  feature, then a clipping search) and its solver :func:`awq_solve`.
"""

from mixjax.quant.activation_aware import awq, awq_solve
from mixjax.quant.activations import (
    OUTPUT,
    ActivationQuant,
    QuantizedApply,
    activation_quant,
    quantized_apply,
)
from mixjax.quant.grids import (
    Grid,
    dequantize,
    expand_scale,
    fake_quantize,
    grid,
    qparams,
    quantize,
    quantize_dequantize,
)
from mixjax.quant.layerwise import gptq, gptq_solve, rtn, rtn_solve
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
    "QuantizedApply",
    "activation_quant",
    "awq",
    "awq_solve",
    "calibrate",
    "dequantize",
    "ema_observer",
    "expand_scale",
    "fake_quant",
    "fake_quantize",
    "gptq",
    "gptq_solve",
    "grid",
    "lsq",
    "minmax_observer",
    "percentile_observer",
    "qparams",
    "quantize",
    "quantize_dequantize",
    "quantized_apply",
    "rtn",
    "rtn_solve",
]
