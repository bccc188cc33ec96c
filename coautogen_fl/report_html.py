"""The markup of a run report (coautogen_fl/report.py): the page's embedded stylesheet and the
small HTML helpers every section is built from (escaping, table numbers, notes, images, tables).
Cells and notes are escaped here, so the sections hand in plain values and get safe HTML back.
"""

from __future__ import annotations

import html
from typing import Any

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1100px;padding:16px 24px;color:#222}
h1{font-size:1.5em;margin-bottom:0.2em} h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:1.6em}
h3{font-size:1em;margin:1em 0 0.3em} nav a{margin-right:12px} .muted{color:#666;font-size:0.9em}
table{border-collapse:collapse;margin:6px 0} td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;font-size:0.9em;vertical-align:top}
th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums}
.strip{height:48px;image-rendering:pixelated;display:block}
.status{display:inline-block;padding:2px 10px;border-radius:10px;color:#fff;font-weight:bold}
.completed{background:#2e7d32} .failed{background:#c62828} .unknown{background:#757575}
.reason{border-left:4px solid #c62828;background:#fdecea;padding:8px 12px;margin:8px 0}
.note{border-left:4px solid #999;background:#f6f6f6;padding:6px 12px;margin:8px 0}
.figs img{margin:4px 8px 4px 0;vertical-align:top;border:1px solid #eee} pre{background:#f6f6f6;padding:8px;overflow-x:auto;font-size:0.8em}
"""  # noqa: E501 (embedded CSS, served as is: wrapping its lines would change the page)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 4) -> str:
    """A number for a table cell; a dash for None (not measured, not reported)."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return _e(value)


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _img(uri: str, alt: str, element_id: str = "", css: str = "") -> str:
    ident = f' id="{_e(element_id)}"' if element_id else ""
    klass = f' class="{css}"' if css else ""
    return f'<img{ident}{klass} src="{uri}" alt="{_e(alt)}">'


def _table(header: list[str], rows: list[list[str]], row_attrs: list[str] | None = None) -> str:
    """An HTML table; cells are HTML already (escape them with _e / _num)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    attrs = row_attrs or [""] * len(rows)
    body = "".join(f"<tr{attr}>{''.join(cells)}</tr>" for attr, cells in zip(attrs, rows))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
