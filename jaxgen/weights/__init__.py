"""Reading released weight files without executing code.

:func:`read_torch_file` reads PyTorch checkpoints (zip and legacy formats,
TorchScript archives) through a restricted unpickler that builds only tensors.
Model- and encoder-specific readers map those tensors onto Flax trees.
"""

from jaxgen.weights.torch_pickle import read_torch_file

__all__ = ["read_torch_file"]
