"""saelib: models, kernels and metrics for the SAE scaling book.

One module per concept: ``data`` (corpus, tokenizer), ``lm`` (subject model),
``activations`` (hooks, store, splice), ``saes`` (the SAE zoo), ``kernels``
(sparse TopK / expert-dispatch autograd Functions with reference twins),
``train`` (the training recipe), ``metrics``, ``plots`` (one figure style),
``config`` (profiles), ``run`` (the notebook runner), ``utils`` (cache,
devices, seeds, progress bars); ``verdicts`` (claim rules), ``scorecard`` (the
book's scorecard page), ``pool`` (independent trainings side by side),
``distributed`` / ``parallel_cost`` / ``train_cli`` (data- and expert-parallel
training on torch.distributed, ``python -m saelib.train``), ``saelens``
(SAELens files), ``moe_lm`` (Switch transformer subject models), ``toy`` (toy
models of superposition), ``universality`` and ``specialization`` (chapter
04 and 02 analyses).
"""

__version__ = "0.1.0"

from importlib import import_module as _import_module

_LAZY = ("activations", "bench", "config", "data", "distributed", "interp", "kernels", "lm", "metrics",
         "moe_lm", "parallel_cost", "plots", "pool", "run", "saelens", "saes", "scaling", "scorecard",
         "specialization", "sweep", "toy", "train", "train_cli", "universality", "utils", "verdicts")


def __getattr__(name):
    if name in _LAZY:
        return _import_module(f"saelib.{name}")
    raise AttributeError(f"module 'saelib' has no attribute {name!r}")
