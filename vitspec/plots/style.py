"""The one plot style: colour-blind-safe palette, markers, line styles, two figure sizes.

Every vitspec figure is made inside :func:`style` and written by :func:`save`, so that fonts,
sizes, colours and file settings (PNG at 200 dpi, PDF with TrueType fonts, reproducible bytes)
are decided here and nowhere else.

Example:
    >>> with style("column"):
    ...     fig, axes = panels("column", 3)
    >>> len(axes), float(fig.get_figwidth())
    (3, 3.5)
"""

from __future__ import annotations

import io
import math
import os
import tempfile
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import matplotlib as mpl
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter
from PIL import Image

from vitspec.errors import VitspecError

#: Okabe & Ito (2008) colours, distinguishable under the common colour-vision deficiencies;
#: the yellow (hard to see on white) comes last.
PALETTE = (
    "#0072B2",  # blue
    "#D55E00",  # vermillion
    "#009E73",  # bluish green
    "#CC79A7",  # reddish purple
    "#E69F00",  # orange
    "#56B4E9",  # sky blue
    "#000000",  # black
    "#F0E442",  # yellow
)
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":")
#: sequential map for depth and heat maps (perceptually uniform, colour-blind-safe)
DEPTH_CMAP = "viridis"
HEAT_CMAP = "cividis"
#: figure widths in inches: one column or the full text width of a two-column paper
WIDTHS = {"column": 3.5, "page": 7.16}
SIZES = tuple(WIDTHS)
DPI = 200
_PANEL_HEIGHT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_size(size: str) -> str:
    """``size`` if it is one of :data:`SIZES`, else a one-line error naming them.

    Example:
        >>> check_size("page")
        'page'
    """
    if size not in WIDTHS:
        raise VitspecError(f"unknown figure size {size!r}; allowed: {', '.join(SIZES)}")
    return size


def rc(size: str) -> dict:
    """The matplotlib settings of ``size`` (fonts in points, TrueType in PDF, fixed hash salt)."""
    base = 7.0 if check_size(size) == "column" else 8.0
    return {
        "font.size": base,
        "axes.titlesize": base,
        "axes.labelsize": base,
        "xtick.labelsize": base - 1,
        "ytick.labelsize": base - 1,
        "legend.fontsize": base - 1,
        "legend.title_fontsize": base - 1,
        "figure.titlesize": base + 1,
        "axes.prop_cycle": mpl.cycler(color=PALETTE),
        "axes.grid": True,
        "grid.alpha": 0.3,
        "grid.linewidth": 0.5,
        "lines.linewidth": 1.2,
        "lines.markersize": 3.0,
        "legend.frameon": False,
        "pdf.fonttype": 42,  # TrueType, never Type 3
        "ps.fonttype": 42,
        "svg.hashsalt": "vitspec",
        "savefig.dpi": DPI,
    }


@contextmanager
def style(size: str = "page") -> Iterator[None]:
    """Make and save figures of ``size`` (``"column"`` or ``"page"``) inside this block."""
    with mpl.rc_context(rc(size)):
        yield


def series(i: int) -> dict:
    """Colour, marker and line style of the i-th series (run, head, site): three cues at once.

    Example:
        >>> series(1)["marker"], series(9)["ls"]
        ('s', '--')
    """
    k = len(PALETTE) - 1  # the yellow is left out of series
    return {
        "color": PALETTE[i % k],
        "marker": MARKERS[i % len(MARKERS)],
        "ls": LINESTYLES[(i // k) % len(LINESTYLES)],
    }


def run_series(i: int) -> dict:
    """Style of the i-th run when runs are overlaid: colour, marker and line style all change."""
    return {**series(i), "ls": LINESTYLES[i % len(LINESTYLES)]}


def tidy_log(ax: Axes) -> None:
    """Log y axis: with fewer than two decades marked, label a few minor ticks plainly too."""
    ax.set_yscale("log")
    low, high = ax.dataLim.y0, ax.dataLim.y1
    decades = math.floor(math.log10(high)) - math.ceil(math.log10(low)) + 1 if low > 0 else 2
    if decades < 2:
        subs = tuple(range(1, 10)) if high / low < 3 else (2, 5)
        ax.yaxis.set_minor_locator(LogLocator(subs=subs))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2g"))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.2g"))
    else:
        ax.yaxis.set_minor_formatter(NullFormatter())


def panels(
    size: str, n: int, *, ncols: int | None = None, aspect: float = 0.75, extra: float = 0.0
) -> tuple[Figure, list[Axes]]:
    """A figure of ``size`` width holding ``n`` panels in a grid.

    Args:
        size: ``"column"`` or ``"page"``.
        n: number of panels.
        ncols: columns (default: up to 2 in a column, up to 4 on a page).
        aspect: panel height / panel width.
        extra: inches added to the height (titles, legends below).

    Returns:
        The figure (constrained layout) and its first ``n`` axes; unused cells are hidden.
    """
    width = WIDTHS[check_size(size)]
    ncols = ncols or min(n, 2 if size == "column" else 4)
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    if size == "page" and ncols == 1:  # one full-width panel: flatter, not a poster
        aspect *= 0.6
    height = nrows * (width / ncols) * aspect + extra
    fig = Figure(figsize=(width, height), layout="constrained")
    _PANEL_HEIGHT[fig] = (width / ncols) * aspect
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def fit(fig: Figure) -> Figure:
    """Grow ``fig`` until its panels keep the height :func:`panels` planned for them, so that
    titles, wrapped headings and legends below never squash the data.

    Example:
        >>> fig, axes = panels("column", 2)
        >>> fit(fig) is fig
        True
    """
    target = _PANEL_HEIGHT.get(fig)
    if target is None:
        return fig
    for _ in range(3):
        fig.draw_without_rendering()
        shown = [ax for ax in fig.axes if ax.get_visible() and ax.get_subplotspec() is not None]
        rows = {ax.get_subplotspec().rowspan.start for ax in shown}
        have = min(ax.get_position().height for ax in shown) * fig.get_figheight()
        if have >= 0.97 * target:
            break
        fig.set_figheight(fig.get_figheight() + (target - have) * len(rows) + 0.05)
    return fig


def _replace(path: Path, write) -> None:
    """``write(tmp)`` then rename onto ``path``: the file appears whole or not at all."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _png(fig: Figure, path: str) -> None:
    """200 dpi PNG reduced to a 256-colour palette (line art loses nothing visible, the file
    shrinks about three times)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    with Image.open(buf) as image:
        rgb = image.convert("RGB")
    rgb.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        path, format="png", optimize=True, dpi=(DPI, DPI)
    )


def save(fig: Figure, out_dir: str | Path, stem: str) -> list[Path]:
    """Write ``stem.png`` (200 dpi) and ``stem.pdf`` (TrueType fonts) into ``out_dir``.

    Each file appears whole or not at all (written beside, then renamed); the bytes depend only
    on the figure (no creation date, no software version in the PDF).
    """
    out_dir = Path(out_dir)
    png, pdf = out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"
    with mpl.rc_context({"pdf.fonttype": 42, "ps.fonttype": 42, "svg.hashsalt": "vitspec"}):
        _replace(png, lambda tmp: _png(fig, tmp))
        _replace(
            pdf,
            lambda tmp: fig.savefig(
                tmp,
                format="pdf",
                metadata={"CreationDate": None, "Producer": None, "Creator": None},
            ),
        )
    return [png, pdf]
