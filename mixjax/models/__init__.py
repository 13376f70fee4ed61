"""Reference image classifiers (LeNet-300-100, LeNet-5, a small CNN) in Flax linen and NNX.

* :mod:`~mixjax.models.linen`: :class:`LeNet300100`, :class:`LeNet5`, :class:`SmallCNN` and
  :func:`create` by name;
* :mod:`~mixjax.models.nnx`: :class:`NNXClassifier`, :class:`NNXLeNet300100`,
  :class:`NNXLeNet5`;
* :mod:`~mixjax.models.spec`: the layer :class:`Spec` both share.
"""

from mixjax.models.linen import MODELS, LeNet5, LeNet300100, SmallCNN, create
from mixjax.models.nnx import NNXClassifier, NNXLeNet5, NNXLeNet300100
from mixjax.models.spec import LENET5, LENET300100, Spec, small_cnn_spec

__all__ = [
    "LENET5",
    "LENET300100",
    "MODELS",
    "LeNet5",
    "LeNet300100",
    "NNXClassifier",
    "NNXLeNet5",
    "NNXLeNet300100",
    "SmallCNN",
    "Spec",
    "create",
    "small_cnn_spec",
]
