r"""Tables -> CSV (byte-stable), Markdown and LaTeX (booktabs), with the best entry per column in bold.

A :class:`Table` is a tidy DataFrame plus a description of its columns. Aggregated value columns
follow one naming rule: a value ``v`` aggregated over seeds is stored as ``v_mean`` and ``v_std``
(sample standard deviation, ``ddof=1``; NaN for a single seed) and rendered ``mean ± std``
(``$0.902 \pm 0.004$`` in LaTeX); a plain column ``v`` is rendered as is.

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
    "FLOAT_FORMAT",
    "Table",
    "escape_latex",
    "export_table",
    "format_cell",
    "to_latex",
    "to_markdown",
]

FLOAT_FORMAT = "%.6g"
"""printf format of floats in every CSV (six significant digits: stable under last-bit noise)."""


@dataclass(frozen=True)
class Column:
    """One displayed value column.

    Args:
        key: base name in the data: ``key`` itself, or ``key_mean``/``key_std`` when aggregated.
        label: header text (plain; escaped for LaTeX).
        better: ``"max"`` or ``"min"`` to set the best entry in bold, ``None`` for no bold.
        digits: decimals shown in Markdown/LaTeX.
        timing: a wall-clock column: kept out of ``<name>.csv`` (goes to ``<name>_timing.csv``).
        sci: show in scientific notation (e.g. relative errors).
    """

    key: str
    label: str
    better: Optional[str] = None
    digits: int = 3
    timing: bool = False
    sci: bool = False

    def __post_init__(self) -> None:
        if self.better not in (None, "max", "min"):
            raise ConfigError(f"The 'better' parameter of Column must be 'max', 'min' or None. Got {self.better!r} instead.")


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

    def __post_init__(self) -> None:
        cols = set(self.data.columns)
        missing = [k for k in self.keys if k not in cols]
        for c in self.columns:
            if c.key not in cols and f"{c.key}_mean" not in cols:
                missing.append(c.key)
        if missing:
            raise ConfigError(f"The 'data' parameter of Table {self.name!r} must have columns {missing}. "
                              f"Got {sorted(map(str, cols))} instead.")
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
        if c.better is None:
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

    Example:
        >>> format_cell(0.9016, 0.0041)
        '0.902 ± 0.004'
        >>> format_cell(0.9016, float('nan'), latex=True)
        '0.902'
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
    if std is not None and isinstance(std, (int, float)) and not math.isnan(float(std)):
        text += (r" \pm " if latex else " ± ") + num(float(std))
    return f"${text}$" if latex and "\\pm" in text else text


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
                elif text.startswith("$"):  # \textbf does not reach into math mode
                    text = rf"$\mathbf{{{text[1:-1]}}}$"
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
    """GitHub Markdown rendering (caption as a bold line, best entries in ``**bold**``)."""
    headers = [table.key_labels.get(k, k) for k in table.keys] + [c.label for c in table.columns]
    align = ["---"] * len(table.keys) + ["---:"] * len(table.columns)
    lines = [f"**{table.caption}**", "", "| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in _cells(table, latex=False)]
    return "\n".join(lines) + "\n"


def to_latex(table: Table, provenance: Optional[Dict[str, Any]] = None) -> str:
    r"""A complete ``table`` environment with ``booktabs`` rules (needs ``\usepackage{booktabs}``)."""
    headers = [escape_latex(table.key_labels.get(k, k)) for k in table.keys] + \
        [escape_latex(c.label) for c in table.columns]
    spec = "l" * len(table.keys) + "r" * len(table.columns)
    lines = []
    if provenance:
        for k in sorted(provenance):
            lines.append(f"% {k}: {provenance[k]}")
    env = "table*" if len(headers) > 6 else "table"  # wide tables span both columns
    lines += [rf"\begin{{{env}}}[t]", r"\centering", r"\small",
              rf"\caption{{{escape_latex(table.caption)}}}", rf"\label{{tab:{table.name}}}",
              rf"\begin{{tabular}}{{{spec}}}", r"\toprule", " & ".join(headers) + r" \\", r"\midrule"]
    prev_group = None
    for i, row in zip(table.data.index, _cells(table, latex=True)):
        if table.best_within:
            g = tuple(table.data.loc[i, table.best_within])
            if prev_group is not None and g != prev_group:
                lines.append(r"\midrule")
            prev_group = g
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

