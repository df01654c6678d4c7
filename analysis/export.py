r"""Tables -> CSV (byte-stable), Markdown and LaTeX (booktabs), with the best entry per column in bold.

A :class:`Table` is a tidy DataFrame plus a description of its columns. Aggregated value columns
follow one naming rule: a value ``v`` aggregated over seeds is stored as ``v_mean`` and ``v_std``
(sample standard deviation, ``ddof=1``; NaN for a single seed) and rendered ``mean ± std``
(in LaTeX ``$0.902${\scriptsize$\,\pm\,$0.004}``: the std at 7 pt beside the 9-pt mean); a plain
column ``v`` is rendered as is.

Camera-ready LaTeX (:func:`to_latex`): booktabs rules, math headers (``Column.latex``, e.g.
``$\mathrm{ESS}_c/n_c$``; ``\\`` breaks a header into lines), ``\small`` (9 pt) body, and a
``table`` (one column, 3.25 in) or ``table*`` (full text width, 6.75 in) environment chosen from
the estimated width of the rendered columns (:func:`latex_width`). In-sample columns
(``Column(in_sample=True)``, e.g. the validation accuracy that the learned weights were fitted
to) are labelled "in-sample" and never set in bold.

Reproducibility contract (checked by ``tests/test_analysis.py`` and the quick reproduction):

* ``<name>.csv`` holds the key columns and every non-timing value column, rows in the table's
  deterministic order, floats written with ``float_format`` (``%.6g``): the same runs give the same
  bytes;
* wall-clock columns (``Column(timing=True)``) never enter ``<name>.csv``; they go to
  ``<name>_timing.csv`` (with the key columns), and into the Markdown/LaTeX renderings, which are
  therefore *not* byte-stable when a table has timings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from reweight.errors import ConfigError
from reweight.runs import atomic_write_text

__all__ = [
    "Column",
    "DOUBLE_COL_PT",
    "FLOAT_FORMAT",
    "SINGLE_COL_PT",
    "Table",
    "TableWidthWarning",
    "escape_latex",
    "export_table",
    "format_cell",
    "latex_width",
    "to_latex",
    "to_markdown",
]

FLOAT_FORMAT = "%.6g"
"""printf format of floats in every CSV (six significant digits: stable under last-bit noise)."""

SINGLE_COL_PT = 3.25 * 72.27
"""Column width of the house layout in TeX points (3.25 in)."""

DOUBLE_COL_PT = 6.75 * 72.27
"""Text width of the house layout in TeX points (6.75 in)."""

IN_SAMPLE_NOTE = ("In-sample: measured on the clean validation split that the learned weights were fitted to "
                  "(the outer objective), so it is not a held-out estimate and is never marked best.")


class TableWidthWarning(UserWarning):
    """A LaTeX table is estimated wider than the text width (6.75 in) at 9 pt."""


@dataclass(frozen=True)
class Column:
    r"""One displayed value column.

    Args:
        key: base name in the data: ``key`` itself, or ``key_mean``/``key_std`` when aggregated.
        label: header text (plain; Markdown, and LaTeX when ``latex`` is not given, escaped).
        better: ``"max"`` or ``"min"`` to set the best entry in bold, ``None`` for no bold.
        digits: decimals shown in Markdown/LaTeX.
        timing: a wall-clock column: kept out of ``<name>.csv`` (goes to ``<name>_timing.csv``).
        sci: show in scientific notation (e.g. relative errors).
        latex: LaTeX header (math allowed, ``\\`` breaks lines), e.g. ``r"$\mathrm{ESS}_c/n_c$"``.
        in_sample: measured on data the method was fitted to (validation accuracy of learned
            weights): labelled "in-sample" and never bold (``better`` must then be ``None``).
    """

    key: str
    label: str
    better: Optional[str] = None
    digits: int = 3
    timing: bool = False
    sci: bool = False
    latex: Optional[str] = None
    in_sample: bool = False

    def __post_init__(self) -> None:
        if self.better not in (None, "max", "min"):
            raise ConfigError(f"The 'better' parameter of Column must be 'max', 'min' or None. "
                              f"Got {self.better!r} instead.")
        if self.in_sample and self.better is not None:
            raise ConfigError(f"The 'better' parameter of Column {self.key!r} must be None for an in-sample column "
                              f"(in-sample numbers are never marked best). Got {self.better!r} instead.")

    def markdown_header(self) -> str:
        """Plain header (``label``, with ``(in-sample)`` appended for an in-sample column)."""
        return f"{self.label} (in-sample)" if self.in_sample else self.label

    def latex_header(self) -> str:
        """LaTeX header lines joined by ``\\`` (an in-sample column gets an ``(in-sample)`` line)."""
        text = self.latex if self.latex is not None else escape_latex(self.label)
        return text + r"\\(in-sample)" if self.in_sample else text


@dataclass
class Table:
    """A result table ready for export.

    Args:
        name: file stem (``<name>.csv``, ``.md``, ``.tex``).
        data: tidy DataFrame, rows already in their final order.
        keys: identifying columns (shown first, rendered as text).
        columns: value columns.
        caption: one-sentence caption (Markdown heading, LaTeX ``\\caption``).
        best_within: key columns whose groups are compared separately for the bold best
            (e.g. ``["setting"]``: the best method per setting); empty = whole column.
        exclude_from_best: ``{key column: [values]}`` rows never set in bold (e.g. an oracle).
        key_labels: header text of the key columns (defaults to the names).
        sources: provenance of the rows (``[{run, config_hash, ...}]``), written by the caller.
        notes: sentences printed under the table (Markdown) / appended to the caption (LaTeX),
            e.g. which config fields the rows are grouped by.
        key_latex: LaTeX header of key columns (math allowed), e.g. ``{"lam": r"$\\lambda$"}``.
        span_keys: key columns (config fields that tell groups of runs apart) that LaTeX shows as
            a spanning line ``field = value`` above each group instead of a column, so they never
            widen the table; Markdown keeps them as columns.
    """

    name: str
    data: Any
    keys: List[str]
    columns: List[Column]
    caption: str
    best_within: List[str] = field(default_factory=list)
    exclude_from_best: Dict[str, List[Any]] = field(default_factory=dict)
    key_labels: Dict[str, str] = field(default_factory=dict)
    sources: List[Dict[str, Any]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    key_latex: Dict[str, str] = field(default_factory=dict)
    span_keys: List[str] = field(default_factory=list)

    def all_notes(self) -> List[str]:
        """``notes`` plus the in-sample note when a column is in-sample."""
        extra = [IN_SAMPLE_NOTE] if any(c.in_sample for c in self.columns) else []
        return list(self.notes) + [n for n in extra if n not in self.notes]

    def __post_init__(self) -> None:
        cols = set(self.data.columns)
        missing = [k for k in self.keys if k not in cols]
        for c in self.columns:
            if c.key not in cols and f"{c.key}_mean" not in cols:
                missing.append(c.key)
        if missing:
            raise ConfigError(f"The 'data' parameter of Table {self.name!r} must have columns {missing}. "
                              f"Got {sorted(map(str, cols))} instead.")
        stray = [k for k in self.span_keys if k not in self.keys]
        if stray:
            raise ConfigError(f"The 'span_keys' parameter of Table {self.name!r} must list key columns "
                              f"{self.keys}. Got {stray} instead.")
        if self.data.empty:
            raise ConfigError(f"The 'data' parameter of Table {self.name!r} must have at least one row. Got 0 rows.")

    # ---- helpers ------------------------------------------------------------------------------
    def aggregated(self, c: Column) -> bool:
        return f"{c.key}_mean" in self.data.columns

    def value(self, c: Column):
        """The column's central value (``_mean`` if aggregated) as a float Series."""
        import pandas as pd

        return pd.to_numeric(self.data[f"{c.key}_mean" if self.aggregated(c) else c.key], errors="coerce")

    def best_mask(self, c: Column):
        """Boolean Series: rows holding the best value of ``c`` (within ``best_within`` groups)."""
        import pandas as pd

        v = self.value(c)
        mask = pd.Series(False, index=self.data.index)
        if c.better is None or c.in_sample:
            return mask
        eligible = v.notna()
        for k, vals in self.exclude_from_best.items():
            if k in self.data.columns:
                eligible &= ~self.data[k].isin(vals)
        groups = [self.data.index] if not self.best_within else \
            [g.index for _, g in self.data.groupby(self.best_within, sort=False, dropna=False)]
        for idx in groups:
            sel = v.loc[idx][eligible.loc[idx]]
            if len(sel) < 2:  # a single candidate is not "best" of anything
                continue
            # round to the displayed precision so that visually tied entries are all bold
            r = sel.round(c.digits) if not c.sci else sel
            target = r.max() if c.better == "max" else r.min()
            mask.loc[r.index[r == target]] = True
        return mask

    def csv_frame(self, timing: bool = False):
        """Key columns plus the (non-)timing value columns in CSV layout."""
        cols = list(self.keys)
        for c in self.columns:
            if c.timing != timing:
                continue
            cols += [f"{c.key}_mean", f"{c.key}_std"] if self.aggregated(c) else [c.key]
        if not timing and "n_runs" in self.data.columns:
            cols.append("n_runs")
        return self.data[cols]


def format_cell(mean: Any, std: Any = None, digits: int = 3, sci: bool = False, latex: bool = False) -> str:
    r"""``mean ± std`` text of one cell (``--`` for missing; the ``± std`` part only when std is finite).

    In LaTeX the mean is in math mode and the std follows in ``\scriptsize``.

    Example:
        >>> format_cell(0.9016, 0.0041)
        '0.902 ± 0.004'
        >>> format_cell(0.9016, float('nan'), latex=True)
        '$0.902$'
        >>> format_cell(0.9016, 0.0041, latex=True)
        '$0.902${\\scriptsize$\\,\\pm\\,$0.004}'
    """
    def num(x: float) -> str:
        return f"{x:.{max(digits - 1, 1)}e}" if sci else f"{x:.{digits}f}"

    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "--"
    if not isinstance(mean, (int, float)) or isinstance(mean, bool):
        return escape_latex(str(mean)) if latex else str(mean)
    if isinstance(mean, int) and std is None:
        return str(mean)
    text = num(float(mean))
    has_std = std is not None and isinstance(std, (int, float)) and not math.isnan(float(std))
    if not latex:
        return text + (" ± " + num(float(std)) if has_std else "")
    text = f"${text}$"
    if has_std:  # the std one size smaller (7 pt beside a 9-pt mean): the columns stay narrow
        text += rf"{{\scriptsize$\,\pm\,${num(float(std))}}}"
    return text


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$",
                  "≥": r"$\geq$", "≤": r"$\leq$", "λ": r"$\lambda$", "α": r"$\alpha$", "×": r"$\times$"}


def escape_latex(text: str) -> str:
    r"""Escape LaTeX specials (``_`` -> ``\_``, ``%`` -> ``\%``, ...; ``±``/``λ``/``α`` -> math).

    Example:
        >>> escape_latex("ess_ratio 10%")
        'ess\\_ratio 10\\%'
    """
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def _key_text(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _cells(table: Table, latex: bool) -> List[List[str]]:
    d = table.data
    out: List[List[str]] = []
    masks = {c.key: table.best_mask(c) for c in table.columns}
    for i in d.index:
        row = [escape_latex(_key_text(d.at[i, k])) if latex else _key_text(d.at[i, k]) for k in table.keys]
        for c in table.columns:
            if table.aggregated(c):
                mean, std = d.at[i, f"{c.key}_mean"], d.at[i, f"{c.key}_std"]
            else:
                mean, std = d.at[i, c.key], None
            mean = _py(mean)
            std = _py(std)
            text = format_cell(mean, std, c.digits, c.sci, latex)
            if bool(masks[c.key].at[i]) and text != "--":
                if not latex:
                    text = f"**{text}**"
                elif text.startswith("$"):  # \textbf does not reach into math mode: bold the mean
                    end = text.index("$", 1)
                    text = rf"$\mathbf{{{text[1:end]}}}$" + text[end + 1:]
                else:
                    text = rf"\textbf{{{text}}}"
            row.append(text)
        out.append(row)
    return out


def _py(x: Any) -> Any:
    if x is None:
        return None
    if hasattr(x, "item"):
        x = x.item()
    try:
        import pandas as pd

        if pd.isna(x):
            return float("nan")
    except (TypeError, ValueError):
        pass
    return x


def to_markdown(table: Table) -> str:
    """GitHub Markdown rendering (caption as a bold line, best entries in ``**bold**``, notes below)."""
    headers = [table.key_labels.get(k, k) for k in table.keys] + [c.markdown_header() for c in table.columns]
    align = ["---"] * len(table.keys) + ["---:"] * len(table.columns)
    lines = [f"**{table.caption}**", "", "| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in _cells(table, latex=False)]
    notes = table.all_notes()
    if notes:
        lines += [""] + [f"*{n}*" for n in notes]
    return "\n".join(lines) + "\n"


# ---- LaTeX width estimate -----------------------------------------------------------------------
# Advance widths of Computer Modern Roman (cmr10) at 10 pt, in pt, from its TFM file (rounded to
# 0.01 pt). Letters not listed use 5.0 pt (lower case) / 7.5 pt (upper case); other glyphs 5.0 pt.
_CMR10 = {
    **dict.fromkeys("0123456789", 5.0), ".": 2.78, ",": 2.78, ":": 2.78, ";": 2.78, " ": 3.33, "-": 3.33,
    "(": 3.89, ")": 3.89, "[": 2.78, "]": 2.78, "/": 5.0, "%": 8.33, "+": 7.78, "=": 7.78, "*": 5.0,
    "a": 5.0, "b": 5.56, "c": 4.44, "d": 5.56, "e": 4.44, "f": 3.06, "g": 5.0, "h": 5.56, "i": 2.78, "j": 3.06,
    "k": 5.28, "l": 2.78, "m": 8.33, "n": 5.56, "o": 5.0, "p": 5.56, "q": 5.28, "r": 3.92, "s": 3.94, "t": 3.89,
    "u": 5.56, "v": 5.28, "w": 7.22, "x": 5.28, "y": 5.28, "z": 4.44, "A": 7.5, "B": 7.08, "C": 7.22, "D": 7.64,
    "E": 6.81, "F": 6.53, "G": 7.85, "H": 7.5, "I": 3.61, "J": 5.14, "K": 7.78, "L": 6.25, "M": 9.17, "N": 7.5,
    "O": 7.78, "P": 6.81, "Q": 7.78, "R": 7.36, "S": 5.56, "T": 7.22, "U": 7.5, "V": 7.5, "W": 10.28, "X": 7.5,
    "Y": 7.5, "Z": 6.11, "_": 5.0,
}
_MACROS = {r"\pm": 7.78 + 4.44, r"\times": 7.78 + 4.44, r"\alpha": 6.4, r"\lambda": 5.83, r"\rho": 5.17,
           r"\Delta": 8.33, r"\dagger": 4.44, r"\,": 1.67, r"\%": 8.33, r"\_": 5.0, r"\&": 7.78, r"\#": 8.33,
           r"\textasciitilde{}": 5.0, r"\textasciicircum{}": 5.0, r"\textbackslash{}": 5.0, r"\geq": 7.78,
           r"\leq": 7.78, r"\min": 12.8, r"\max": 14.7}


def _text_width(tex: str, size: float = 10.0) -> float:
    r"""Estimated width in pt of one line of LaTeX ``tex`` set at ``size`` pt (Computer Modern).

    A heuristic, not TeX: glyph widths from :data:`_CMR10` (bold +10 %), sub/superscripts at
    70 %, ``\scriptsize`` groups at 7 pt, ``$`` and braces take no room, unknown macros 5 pt.
    """
    import re

    width, scale_stack = 0.0, [1.0]
    tokens = re.findall(r"\\[A-Za-z]+(?:\{\})?|\\.|[_^]\{|[_^].|.", tex)
    pending = []  # scales pushed by the next "{"
    for t in tokens:
        scale = scale_stack[-1] * size / 10.0
        if t in ("$",):
            continue
        if t == "{":
            scale_stack.append(pending.pop() if pending else scale_stack[-1])
            continue
        if t == "}":
            if len(scale_stack) > 1:
                scale_stack.pop()
            continue
        if t[0] in "_^" and len(t) == 2:
            if t[1] == "{":
                scale_stack.append(scale_stack[-1] * 0.7)
            else:
                width += _CMR10.get(t[1], 5.0) * scale * 0.7
            continue
        if t == r"\scriptsize":  # 7 pt whatever the body size
            scale_stack[-1] = 7.0 / size
            continue
        if t in (r"\mathbf", r"\textbf"):
            pending.append(scale_stack[-1] * 1.1)
            continue
        if t.startswith("\\"):
            if t in _MACROS:
                width += _MACROS[t] * scale
            elif t in (r"\mathrm", r"\text", r"\textit", r"\mathit", r"\small", r"\footnotesize"):
                pass
            else:
                width += 5.0 * scale
            continue
        width += _CMR10.get(t, 7.5 if t.isupper() else 5.0) * scale
    return width


def _header_lines(text: str) -> List[str]:
    return [x for x in text.split(r"\\")]


def latex_width(table: Table, size: float = 9.0, tabcolsep: float = 6.0) -> float:
    r"""Estimated width in TeX points of the ``tabular`` of :func:`to_latex` set at ``size`` pt.

    Each column is as wide as its widest header line or cell (:func:`_text_width`, a glyph-width
    heuristic for Computer Modern, times a 6 % margin so that it errs on the wide side), plus
    ``2 * tabcolsep``; a spanning group line (``span_keys``) counts as a lower bound. The house text
    width is :data:`DOUBLE_COL_PT` (6.75 in = 487.8 pt) and a column :data:`SINGLE_COL_PT`.
    """
    headers, rows, spans = _latex_layout(table)
    total = 0.0
    for j, h in enumerate(headers):
        w = max(_text_width(line, size) for line in _header_lines(h))
        for r in rows:
            w = max(w, _text_width(r[j], size))
        total += _SAFETY * w + 2 * tabcolsep
    for sp in spans:
        if sp:
            total = max(total, _SAFETY * _text_width(sp, size) + 2 * tabcolsep)
    return total


_SAFETY = 1.06
"""Margin on the glyph-width sum: pdflatex measured 0.97-1.0x the unmargined estimate on the paper tables
(``tests/test_analysis.py`` compiles them when pdflatex is installed)."""


def _latex_layout(table: Table) -> tuple:
    """``(headers, rows, spans)`` of the LaTeX rendering: span-key columns removed, and per row the
    spanning group line to print before it (``""`` when the group does not change)."""
    keep = [j for j, k in enumerate(table.keys) if k not in table.span_keys]
    nk = len(table.keys)
    headers = [table.key_latex.get(table.keys[j], escape_latex(table.key_labels.get(table.keys[j], table.keys[j])))
               for j in keep] + [c.latex_header() for c in table.columns]
    rows, spans, prev = [], [], None
    for i, row in zip(table.data.index, _cells(table, latex=True)):
        rows.append([row[j] for j in keep] + row[nk:])
        if table.span_keys:
            g = tuple(table.data.at[i, k] for k in table.span_keys)
            spans.append("" if g == prev else "; ".join(
                f"{escape_latex(table.key_labels.get(k, k))} = {escape_latex(_key_text(v))}"
                for k, v in zip(table.span_keys, g)))
            prev = g
        else:
            spans.append("")
    return headers, rows, spans


def _stack(header: str, align: str) -> str:
    """A header with ``\\`` line breaks as a one-column ``tabular`` (core LaTeX, no extra package)."""
    if r"\\" not in header:
        return header
    return rf"\begin{{tabular}}[b]{{@{{}}{align}@{{}}}}{header}\end{{tabular}}"


def to_latex(table: Table, provenance: Optional[Dict[str, Any]] = None) -> str:
    r"""A complete ``table``/``table*`` environment with ``booktabs`` rules (needs ``\usepackage{booktabs}``).

    The body is ``\small`` (9 pt); the environment is ``table`` when the estimated width
    (:func:`latex_width`) fits one column (3.25 in), else ``table*`` (6.75 in). A table estimated
    wider than 6.75 in is still written, with a :class:`TableWidthWarning` (and ``\tabcolsep``
    reduced to 3 pt). Notes (grouping by config, in-sample columns) follow the caption.
    """
    import warnings

    headers, rows, spans = _latex_layout(table)
    spec = "l" * (len(headers) - len(table.columns)) + "r" * len(table.columns)
    width = latex_width(table)
    colsep = None
    if width > DOUBLE_COL_PT:
        colsep = 3.0
        narrow = latex_width(table, tabcolsep=colsep)
        if narrow > DOUBLE_COL_PT:
            warnings.warn(f"LaTeX table {table.name!r} is about {narrow / 72.27:.2f} in wide at 9 pt, more than the "
                          f"{DOUBLE_COL_PT / 72.27:.2f} in text width: drop or merge columns.", TableWidthWarning,
                          stacklevel=2)
        width = narrow
    lines = []
    if provenance:
        for k in sorted(provenance):
            lines.append(f"% {k}: {provenance[k]}")
    lines.append(f"% estimated width: {width / 72.27:.2f} in at 9 pt (analysis.export.latex_width)")
    env = "table" if width <= SINGLE_COL_PT else "table*"
    caption = escape_latex(table.caption)
    notes = table.all_notes()
    if notes:
        caption += " " + " ".join(escape_latex(n) for n in notes)
    lines += [rf"\begin{{{env}}}[t]", r"\centering", r"\small"]
    if colsep is not None:
        lines.append(rf"\setlength{{\tabcolsep}}{{{colsep:g}pt}}")
    lines += [rf"\caption{{{caption}}}", rf"\label{{tab:{table.name}}}",
              rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
              " & ".join(_stack(h, a) for h, a in zip(headers, spec)) + r" \\", r"\midrule"]
    prev_group = None
    for i, row, span in zip(table.data.index, rows, spans):
        if table.best_within:
            g = tuple(table.data.loc[i, table.best_within])
            if prev_group is not None and g != prev_group:
                lines.append(r"\midrule")
            prev_group = g
        if span:
            if i != table.data.index[0] and lines[-1] != r"\midrule":
                lines.append(r"\midrule")
            lines.append(rf"\multicolumn{{{len(headers)}}}{{l}}{{\emph{{{span}}}}} \\")
        lines.append(" & ".join(row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", rf"\end{{{env}}}"]
    return "\n".join(lines) + "\n"


def export_table(table: Table, out_dir: str | Path, provenance: Optional[Dict[str, Any]] = None,
                 float_format: str = FLOAT_FORMAT) -> List[Path]:
    """Write ``<name>.csv``, ``<name>_timing.csv`` (if timing columns), ``<name>.md``, ``<name>.tex``.

    Args:
        table: the table.
        out_dir: output folder (created).
        provenance: ``{key: value}`` written as ``%`` comments at the top of the LaTeX file.
        float_format: printf format of CSV floats.

    Returns:
        The written paths, in the order above.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{table.name}.csv"]
    atomic_write_text(paths[0], table.csv_frame().to_csv(index=False, float_format=float_format, lineterminator="\n"))
    if any(c.timing for c in table.columns):
        p = out / f"{table.name}_timing.csv"
        atomic_write_text(p, table.csv_frame(timing=True).to_csv(index=False, float_format="%.4g", lineterminator="\n"))
        paths.append(p)
    paths.append(out / f"{table.name}.md")
    atomic_write_text(paths[-1], to_markdown(table))
    paths.append(out / f"{table.name}.tex")
    atomic_write_text(paths[-1], to_latex(table, provenance))
    return paths

