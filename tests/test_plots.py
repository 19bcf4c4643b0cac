"""saelib.plots: figures reach the executed notebook whatever MPLBACKEND says."""
import matplotlib

from saelib import plots


class FakeShell:
    kernel = object()

    def __init__(self):
        self.magics = []

    def run_line_magic(self, name, arg):
        self.magics.append((name, arg))


def test_inline_backend_in_a_kernel_even_with_agg(monkeypatch):
    monkeypatch.setattr(plots.plt, "get_backend", lambda: "agg")     # MPLBACKEND=Agg in the kernel's env
    shell = FakeShell()
    assert plots._inline_in_kernel(shell) is True
    assert shell.magics == [("matplotlib", "inline")]
    monkeypatch.setattr(plots.plt, "get_backend", lambda: "module://matplotlib_inline.backend_inline")
    shell = FakeShell()
    assert plots._inline_in_kernel(shell) is True and shell.magics == []   # already inline: nothing to do


def test_no_kernel_leaves_the_backend_alone():
    class Terminal:
        kernel = None
    backend = matplotlib.get_backend()
    assert plots._inline_in_kernel(Terminal()) is False
    assert plots._inline_in_kernel() is False          # plain pytest: no IPython shell
    assert matplotlib.get_backend() == backend
