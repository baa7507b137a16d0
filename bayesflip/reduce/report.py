"""Render report sections to ``report.md`` (figures linked) and ``report.html`` (PNGs embedded, standalone).

Contract of both renderings:

* every text the reducers give (paragraphs, captions, headings, table cells) goes through the same
  inline Markdown (`code`, **bold**), so no raw backticks reach the HTML;
* a missing value (None, NaN, ``pd.NA``, or the strings "nan" / "NaN" / "None" / "<NA>") is shown as
  :data:`MISSING`, and a table that has one is followed by :data:`MISSING_LEGEND`;
* HTML tables sit in a ``div.tbl`` that scrolls horizontally on screen; in print they wrap instead.
"""

from __future__ import annotations

import base64
import html
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .base import Figure, Heading, Section, Table, Text

MISSING = "—"
MISSING_LEGEND = ("— = no value: not measured, not applicable to this row, or undefined "
                  "(e.g. a statistic over fewer than two values).")
_MISSING_STR = {"nan", "NaN", "None", "<NA>", "NaT"}
SHORT_TEXT = 32  # text cells up to this many characters do not wrap on screen (names, ids); longer ones wrap


def is_missing(v) -> bool:
    """None, NaN, ``pd.NA``/``NaT`` and their string spellings."""
    if v is None or v is pd.NA or v is pd.NaT:
        return True
    if isinstance(v, (float, np.floating)):
        return bool(np.isnan(v))
    return isinstance(v, str) and v.strip() in _MISSING_STR


def fmt_cell(v) -> str:
    """A table cell as text: missing → "—", floats to 4 significant digits (plain digits from 10⁴ to 10⁹)."""
    if is_missing(v):
        return MISSING
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if np.isinf(v):
            return "∞" if v > 0 else "−∞"
        return f"{v:.0f}" if 1e4 <= abs(v) < 1e9 else f"{v:.4g}"
    return str(v)


def _has_missing(df: pd.DataFrame) -> bool:
    return any(is_missing(v) for col in df.columns for v in df[col].tolist())


def md_table(df: pd.DataFrame, max_rows: int = 60) -> str:
    """A GitHub-flavoured Markdown table of the first ``max_rows`` rows (see :func:`fmt_cell`)."""
    if df.empty:
        return "_(empty)_"
    head = df.head(max_rows)
    cols = [str(c) for c in head.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in head.itertuples(index=False):
        lines.append("| " + " | ".join(fmt_cell(v).replace("|", "\\|").replace("\n", " ") for v in row) + " |")
    if len(df) > max_rows:
        lines.append(f"\n_… {len(df) - max_rows} more rows in the CSV/Parquet table._")
    if _has_missing(head):
        lines.append(f"\n_{MISSING_LEGEND}_")
    return "\n".join(lines)


def inline_html(text: str) -> str:
    """Escape, then `code` → <code>, **bold** → <b>."""
    t = html.escape(str(text), quote=False)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", t)


def plain(text: str) -> str:
    """The text without inline Markdown markers (for alt texts and link labels)."""
    return re.sub(r"\*\*([^*]+)\*\*", r"\1", re.sub(r"`([^`]+)`", r"\1", str(text)))


def _text_html(md: str) -> str:
    out = []
    for para in re.split(r"\n\s*\n", md.strip()):
        lines = para.splitlines()
        if para.lstrip().startswith("```"):
            body = "\n".join(ln for ln in lines if not ln.lstrip().startswith("```"))
            out.append(f"<pre>{html.escape(body)}</pre>")
        elif lines and all(ln.lstrip().startswith("- ") for ln in lines):
            out.append("<ul>" + "".join(f"<li>{inline_html(ln.lstrip()[2:])}</li>" for ln in lines) + "</ul>")
        else:
            out.append(f"<p>{inline_html(' '.join(lines))}</p>")
    return "\n".join(out)


def _cell_html(text: str) -> str:
    """Inline Markdown, and a line-break opportunity after each "_" (long snake_case names wrap in print)."""
    return inline_html(text).replace("_", "_<wbr>")


def _numeric(s: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s)


def html_table(df: pd.DataFrame, max_rows: int = 60) -> str:
    """``<div class="tbl"><table>`` of the first ``max_rows`` rows: numbers right-aligned, text left-aligned
    through the inline Markdown (short text unwrapped on screen), missing values as "—" with the legend below."""
    if df.empty:
        return "<p><i>(empty)</i></p>"
    head = df.head(max_rows)
    num = [_numeric(head[c]) for c in head.columns]
    th = "".join(f"<th{' class=num' if n else ''}>{_cell_html(c)}</th>" for c, n in zip(head.columns, num))
    rows = []
    for row in head.itertuples(index=False):
        tds = []
        for v, n in zip(row, num):
            text = fmt_cell(v)
            cls = (" class=miss" if is_missing(v) else " class=num" if n else
                   " class=nw" if len(text) <= SHORT_TEXT else "")
            tds.append(f"<td{cls}>{_cell_html(text)}</td>")
        rows.append("<tr>" + "".join(tds) + "</tr>")
    out = [f"<div class=tbl><table><thead><tr>{th}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"]
    if len(df) > max_rows:
        out.append(f"<p class=note>… {len(df) - max_rows} more rows in the CSV/Parquet table.</p>")
    if _has_missing(head):
        out.append(f"<p class=note>{html.escape(MISSING_LEGEND)}</p>")
    return "\n".join(out)


def render_markdown(title: str, sections: list[Section], report_dir: Path) -> str:
    parts = [f"# {title}", ""]
    for s in sections:
        parts += [f"## {s.title}", ""]
        for b in s.blocks:
            if isinstance(b, Text):
                parts += [b.md, ""]
            elif isinstance(b, Heading):
                parts += [f"{'#' * b.level} {b.text}", ""]
            elif isinstance(b, Table):
                if b.caption:
                    parts += [f"**{b.caption}**", ""]
                parts += [md_table(b.df, b.max_rows), ""]
            elif isinstance(b, Figure):
                rel = Path(os.path.relpath(b.path, report_dir)).as_posix()
                pdf = Path(os.path.relpath(Path(b.path).with_suffix(".pdf"), report_dir)).as_posix()
                parts += [f"![{plain(b.caption)}]({rel})", "", f"_{b.caption}_ ([PDF]({pdf}))", ""]
            else:
                raise TypeError(f"unknown report block {type(b).__name__} in section {s.title!r}")
    return "\n".join(parts)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
.tbl{overflow-x:auto;max-width:100%;margin:0.5em 0 0.4em}
table{border-collapse:collapse;font-size:12px}th,td{padding:3px 8px;border-bottom:1px solid #ddd;
text-align:left;vertical-align:top}th{background:#f4f4f4}td.num,th.num{text-align:right;white-space:nowrap}
td.miss{text-align:center;color:#999}td.nw{white-space:nowrap}td{max-width:36em}p.note{font-size:12px;color:#666;margin:0 0 1.2em}
img{max-width:100%;border:1px solid #eee}figure{margin:1em 0}
figcaption{font-size:13px;color:#555}code{background:#f4f4f4;padding:0 3px}
nav{line-height:1.8}nav a{margin-right:1em;white-space:nowrap}
@media print{body{max-width:none;margin:0}.tbl{overflow:visible}table{width:100%;font-size:9px}
td,td.nw,th,th.num{white-space:normal;max-width:none}td{overflow-wrap:break-word}th{overflow-wrap:anywhere}
figure,tr{break-inside:avoid}nav{display:none}}"""


def render_html(title: str, sections: list[Section]) -> str:
    nav = "".join(f'<a href="#s{i}">{html.escape(plain(s.title))}</a> ' for i, s in enumerate(sections))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1><nav>{nav}</nav>"]
    for i, s in enumerate(sections):
        parts.append(f'<h2 id="s{i}">{inline_html(s.title)}</h2>')
        for b in s.blocks:
            if isinstance(b, Text):
                parts.append(_text_html(b.md))
            elif isinstance(b, Heading):
                parts.append(f"<h{b.level}>{inline_html(b.text)}</h{b.level}>")
            elif isinstance(b, Table):
                if b.caption:
                    parts.append(f"<p><b>{inline_html(b.caption)}</b></p>")
                parts.append(html_table(b.df, b.max_rows))
            elif isinstance(b, Figure):
                data = base64.b64encode(Path(b.path).read_bytes()).decode()
                parts.append(f"<figure><img alt=\"{html.escape(plain(b.caption))}\" "
                             f"src='data:image/png;base64,{data}'><figcaption>{inline_html(b.caption)}</figcaption>"
                             "</figure>")
            else:
                raise TypeError(f"unknown report block {type(b).__name__} in section {s.title!r}")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(out_dir: Path, title: str, sections: list[Section]) -> Path:
    """Write ``report.md`` and ``report.html`` into ``out_dir``; return the Markdown path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "report.md"
    md.write_text(render_markdown(title, sections, out_dir))
    (out_dir / "report.html").write_text(render_html(title, sections))
    return md
