"""Bar charts of benchmark rows (``pyloader bench --plot``, ``bench/plot.py``)."""

from ..errors import PyloaderInputError


def require_matplotlib():
    """``matplotlib.pyplot`` (headless), or an input error saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PyloaderInputError("--plot needs matplotlib, which is not installed: pip install 'pyloader-kernels[plot]'") from None
    return plt


def plot_rows(rows, path) -> None:
    """A bar chart of the rows' GB/s (one case), with the ceiling of the first row, written to ``path``."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(rows) + 1.5))
    ax.barh([r["provider"] for r in rows], [r["gbps"] for r in rows])
    if rows and rows[0].get("ceiling_gbps"):
        ax.axvline(rows[0]["ceiling_gbps"], color="k", linestyle="--", label="ceiling measured in the same run")
        ax.legend()
    ax.set_xlabel("GB/s")
    if rows:  # two lines: the case and the GPU with the commit (one line ran past the figure)
        ax.set_title(f"{rows[0]['case']}\n{rows[0]['gpu']}, commit {rows[0].get('commit', '?')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
