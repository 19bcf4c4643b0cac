"""One figure style for every chapter (seaborn ``whitegrid``, a fixed palette
per architecture and per domain), plus small helpers the notebooks share."""
from __future__ import annotations

import matplotlib.pyplot as plt
import seaborn as sns

ARCH_COLORS = {
    "relu": "#7f7f7f", "gated": "#8c564b", "topk": "#1f77b4", "batchtopk": "#17becf",
    "switch": "#d62728", "scale": "#2ca02c", "naive": "#9467bd", "official": "#e377c2",
}
DOMAIN_COLORS = {"shakespeare": "#8172b3", "pydocs": "#55a868", "kerneldocs": "#c44e52"}


def use_style() -> None:
    """Apply the book's style; call once at the top of a notebook. In a Jupyter kernel it
    first selects the inline backend (``%matplotlib inline``), so figures are stored in the
    executed notebook even when ``MPLBACKEND`` (e.g. ``Agg``) is set in the environment,
    which would otherwise leave every figure and glued figure without its image."""
    _inline_in_kernel()
    sns.set_theme(context="notebook", style="whitegrid", palette="deep", font_scale=0.95)
    plt.rcParams.update({
        "figure.figsize": (6.4, 3.8), "figure.dpi": 110, "savefig.dpi": 110,
        "axes.titleweight": "bold", "axes.spines.top": False, "axes.spines.right": False,
        "legend.frameon": False,
    })


def _inline_in_kernel(shell=None) -> bool:
    """Switch matplotlib to the inline backend when running in an IPython kernel (``shell``:
    the IPython shell, default ``get_ipython()``); True when it did."""
    if shell is None:
        try:
            from IPython import get_ipython
        except ImportError:
            return False
        shell = get_ipython()
    if shell is None or getattr(shell, "kernel", None) is None:
        return False                      # plain Python or a terminal IPython: leave the backend alone
    if "inline" not in str(plt.get_backend()):
        shell.run_line_magic("matplotlib", "inline")
    return True


def color(name: str) -> str:
    """Colour of an architecture or a domain (grey for anything else)."""
    return ARCH_COLORS.get(name) or DOMAIN_COLORS.get(name) or "#4c4c4c"


def subplots(ncols: int = 1, nrows: int = 1, width: float = 6.4, height: float = 3.8, **kw):
    """``plt.subplots`` sized per panel, with constrained layout."""
    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), layout="constrained", **kw)


def domain_palette(domains) -> dict:
    return {d: color(d) for d in domains}
