"""Render report sections to ``report.md`` (figures linked) and ``report.html`` (PNGs embedded, standalone)."""

from __future__ import annotations

import base64
import html
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .base import Figure, Heading, Section, Table, Text


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA:
        return ""
    if isinstance(v, (float, np.floating)):
        return f"{v:.4g}"
    return str(v)


def md_table(df: pd.DataFrame, max_rows: int = 60) -> str:
    """A GitHub-flavoured Markdown table of the first ``max_rows`` rows (floats to 4 significant digits)."""
    if df.empty:
        return "_(empty)_"
    head = df.head(max_rows)
    cols = [str(c) for c in head.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in head.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v).replace("|", "\\|").replace("\n", " ") for v in row) + " |")
    if len(df) > max_rows:
        lines.append(f"\n_… {len(df) - max_rows} more rows in the CSV/Parquet table._")
    return "\n".join(lines)


def _inline_html(text: str) -> str:
    t = html.escape(text)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", t)


def _text_html(md: str) -> str:
    out = []
    for para in re.split(r"\n\s*\n", md.strip()):
        lines = para.splitlines()
        if para.lstrip().startswith("```"):
            body = "\n".join(ln for ln in lines if not ln.lstrip().startswith("```"))
            out.append(f"<pre>{html.escape(body)}</pre>")
        elif lines and all(ln.lstrip().startswith("- ") for ln in lines):
            out.append("<ul>" + "".join(f"<li>{_inline_html(ln.lstrip()[2:])}</li>" for ln in lines) + "</ul>")
        else:
            out.append(f"<p>{_inline_html(' '.join(lines))}</p>")
    return "\n".join(out)


def _html_table(df: pd.DataFrame, max_rows: int) -> str:
    if df.empty:
        return "<p><i>(empty)</i></p>"
    body = df.head(max_rows).to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}", border=0)
    more = f"<p><i>… {len(df) - max_rows} more rows in the CSV/Parquet table.</i></p>" if len(df) > max_rows else ""
    return body + more


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
                parts += [f"![{b.caption}]({rel})", "", f"_{b.caption}_ ([PDF]({pdf}))", ""]
            else:
                raise TypeError(f"unknown report block {type(b).__name__} in section {s.title!r}")
    return "\n".join(parts)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:12px;margin:0.5em 0 1.2em}th,td{padding:3px 8px;border-bottom:1px solid #ddd;
text-align:right}th{background:#f4f4f4}img{max-width:100%;border:1px solid #eee}figure{margin:1em 0}
figcaption{font-size:13px;color:#555}code{background:#f4f4f4;padding:0 3px}nav a{margin-right:1em}"""


def render_html(title: str, sections: list[Section]) -> str:
    nav = "".join(f'<a href="#s{i}">{html.escape(s.title)}</a>' for i, s in enumerate(sections))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1><nav>{nav}</nav>"]
    for i, s in enumerate(sections):
        parts.append(f'<h2 id="s{i}">{html.escape(s.title)}</h2>')
        for b in s.blocks:
            if isinstance(b, Text):
                parts.append(_text_html(b.md))
            elif isinstance(b, Heading):
                parts.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
            elif isinstance(b, Table):
                if b.caption:
                    parts.append(f"<p><b>{html.escape(b.caption)}</b></p>")
                parts.append(_html_table(b.df, b.max_rows))
            elif isinstance(b, Figure):
                data = base64.b64encode(Path(b.path).read_bytes()).decode()
                parts.append(f"<figure><img alt='{html.escape(b.caption)}' src='data:image/png;base64,{data}'>"
                             f"<figcaption>{html.escape(b.caption)}</figcaption></figure>")
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
