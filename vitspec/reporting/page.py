"""The self-contained HTML page: provenance, tables, figures embedded as data URIs, captions.

Nothing on the page refers to anything outside it (no scripts, style sheets, fonts or images
fetched), so it opens offline and can be mailed as one file.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import pandas as pd

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.86em}
td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top}
th{background:#f2f2f2}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1.2em 0 2em}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.9em;color:#333;margin-top:.4em}code{font-size:.92em}
.warn{color:#b00020;font-weight:bold}.pass{color:#006d2c}.fail{color:#b00020;font-weight:bold}
nav li{margin:.1em 0}
"""


def esc(value) -> str:
    """HTML-escaped text of ``value``."""
    return html.escape(str(value), quote=True)


def fmt(value) -> str:
    """Numbers to 4 significant digits; NaN and None as an empty cell."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table(df: pd.DataFrame) -> str:
    """A DataFrame as an HTML table (escaped; numbers right-aligned)."""
    head = "".join(f"<th>{esc(c)}</th>" for c in df.columns)
    rows = []
    for row in df.itertuples(index=False):
        cells = []
        for value in row:
            num = isinstance(value, (int, float)) and not isinstance(value, bool)
            cls = ' class="num"' if num else ""
            text = esc(fmt(value))
            if value in ("pass", "fail"):
                text = f'<span class="{value}">{text}</span>'
            cells.append(f"<td{cls}>{text}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def pairs(items: list[tuple[str, object]]) -> str:
    """A two-column key/value table (values escaped; empty values left out)."""
    rows = "".join(
        f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>"
        for k, v in items
        if v not in (None, "", [], {})
    )
    return f"<table>{rows}</table>"


def figure(png: Path, caption: str, files: str, anchor: str) -> str:
    """A figure embedded as a PNG data URI, with its caption and the names of its files."""
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return (
        f'<figure id="{esc(anchor)}"><img alt="{esc(caption[:120])}" '
        f'src="data:image/png;base64,{data}"><figcaption>{esc(caption)} '
        f"<code>{esc(files)}</code></figcaption></figure>"
    )


def provenance(info: dict) -> list[tuple[str, object]]:
    """The provenance rows of an analyze or verify run from its run.json / verify.json."""
    weights = info.get("weights") if isinstance(info.get("weights"), dict) else {}
    images = info.get("images") if isinstance(info.get("images"), dict) else {}
    random = info.get("random_init")
    skipped = images.get("skipped") or []
    return [
        ("model", f"{info.get('model', '')} (timm: {info.get('timm_name', '')})"),
        (
            "weights",
            "RANDOM INIT (untrained), seed " + str(info.get("seed", weights.get("seed")))
            if random
            else info.get("checkpoint"),
        ),
        ("checkpoint path", weights.get("path")),
        ("checkpoint sha256", weights.get("sha256")),
        (
            "images",
            f"{images.get('used', '?')} used from {images.get('source', '?')}"
            + (f", {len(skipped)} skipped" if skipped else ""),
        ),
        ("sites", ", ".join(info.get("sites", []))),
        (
            "stages",
            "; ".join(
                f"layers {s['first_layer']}-{s['last_layer']}: grid "
                f"{'x'.join(map(str, s['grid']))}, {s.get('channels')} channels"
                for s in info.get("stages") or []
            ),
        ),
        ("unavailable", "; ".join(f"{k}: {v}" for k, v in (info.get("unavailable") or {}).items())),
        (
            "versions",
            ", ".join(
                f"{k} {info[k]}" for k in ("vitspec", "torch", "timm", "python") if info.get(k)
            ),
        ),
        (
            "device",
            f"{info.get('device', '')} {info.get('device_name', '')}, "
            f"{info.get('dtype', '')}, batch {info.get('batch_size', '')}",
        ),
        ("time", _time(info)),
        ("command", info.get("command")),
    ]


def _time(info: dict) -> str:
    parts = [str(info[k]) for k in ("started", "finished", "time", "date") if info.get(k)]
    if info.get("wall_time_s") is not None:
        parts.append(f"wall time {info['wall_time_s']} s, {info.get('images_per_s', '?')} img/s")
    return ", ".join(parts)


def page(title: str, sections: list[tuple[str, str, str]], intro: str) -> str:
    """The whole page: a title, a contents list and the ``(anchor, heading, body)`` sections."""
    nav = "".join(f'<li><a href="#{esc(a)}">{esc(h)}</a></li>' for a, h, _ in sections)
    body = "".join(f'<section id="{esc(a)}"><h2>{esc(h)}</h2>{b}</section>' for a, h, b in sections)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{esc(title)}</h1>{intro}<nav><ul>{nav}</ul></nav>{body}</body></html>\n"
    )
