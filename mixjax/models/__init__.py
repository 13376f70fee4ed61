"""Reference models in Flax linen and NNX: small image classifiers and real architectures.

* :mod:`~mixjax.models.registry`: :data:`MODELS`, every model by name with its task and sizes,
  and :func:`create`;
* :mod:`~mixjax.models.linen`: :class:`LeNet300100`, :class:`LeNet5`, :class:`SmallCNN`;
* :mod:`~mixjax.models.nnx`: :class:`NNXClassifier`, :class:`NNXLeNet300100`,
  :class:`NNXLeNet5`;
* :mod:`~mixjax.models.spec`: the layer :class:`Spec` both share;
* :mod:`~mixjax.models.resnet`: CIFAR-style ResNet-20 with BatchNorm (``axis_name`` for
  cross-replica statistics), :class:`ResNet20` and :class:`NNXResNet20`;
* :mod:`~mixjax.models.vit`: a tiny ViT, :class:`ViTTiny` and :class:`NNXViTTiny`, and their
  pre-LN :class:`TransformerBlock` / :class:`NNXTransformerBlock`;
* :mod:`~mixjax.models.gpt`: a tiny decoder-only causal LM (nanoGPT's shape, tied embeddings
  optional), :class:`GPTTiny` and :class:`NNXGPTTiny`.

The linen image models map ``(N, H, W, C)`` float images to ``(N, num_classes)`` logits, the
language models ``(B, L)`` integer tokens to ``(B, L, vocab_size)`` logits. ResNet-20, ViT and
GPT take ``train`` as a keyword (linen) or follow ``.train()`` / ``.eval()`` (NNX), and name
their layers the same in both APIs.
"""

from mixjax.models.gpt import GPTTiny, NNXGPTTiny
from mixjax.models.linen import LeNet5, LeNet300100, SmallCNN
from mixjax.models.nnx import NNXClassifier, NNXLeNet5, NNXLeNet300100
from mixjax.models.registry import MODELS, SIZES, TASKS, ModelInfo, create
from mixjax.models.resnet import BasicBlock, NNXBasicBlock, NNXResNet20, ResNet20
from mixjax.models.spec import LENET5, LENET300100, Spec, small_cnn_spec
from mixjax.models.vit import NNXTransformerBlock, NNXViTTiny, TransformerBlock, ViTTiny

__all__ = [
    "LENET5",
    "LENET300100",
    "MODELS",
    "SIZES",
    "TASKS",
    "BasicBlock",
    "GPTTiny",
    "LeNet5",
    "LeNet300100",
    "ModelInfo",
    "NNXBasicBlock",
    "NNXClassifier",
    "NNXGPTTiny",
    "NNXLeNet5",
    "NNXLeNet300100",
    "NNXResNet20",
    "NNXTransformerBlock",
    "NNXViTTiny",
    "ResNet20",
    "SmallCNN",
    "Spec",
    "TransformerBlock",
    "ViTTiny",
    "create",
    "small_cnn_spec",
]
