"""saelib: models, kernels and metrics for the SAE scaling book.

One module per concept: ``data`` (corpus, tokenizer), ``lm`` (subject model),
``activations`` (hooks, store, splice), ``saes`` (the SAE zoo), ``kernels``
(sparse TopK / expert-dispatch autograd Functions with reference twins),
``train`` (the training recipe), ``metrics``, ``plots`` (one figure style),
``config`` (profiles), ``run`` (the notebook runner), ``utils`` (cache,
devices, seeds, progress bars).
"""

__version__ = "0.1.0"

from importlib import import_module as _import_module

_LAZY = ("activations", "bench", "config", "data", "interp", "kernels", "lm", "metrics",
         "plots", "run", "saes", "scaling", "train", "utils")


def __getattr__(name):
    if name in _LAZY:
        return _import_module(f"saelib.{name}")
    raise AttributeError(f"module 'saelib' has no attribute {name!r}")
