"""Render a ``reports.tables.Table``: GitHub Markdown, and LaTeX (booktabs) via pandas' Styler.

The LaTeX is a ``table`` float holding one ``tabular``; it needs only ``booktabs``:
``\\documentclass{article}\\usepackage{booktabs}\\begin{document}\\input{table1.tex}
\\end{document}`` compiles it.
"""

from __future__ import annotations

import pandas as pd

from reports.tables import Table

# Non-ASCII characters the tables print, as plain-LaTeX math (no extra packages needed).
_LATEX_SYMBOLS = {"λ0": r"$\lambda_0$", "λ": r"$\lambda$", "±": r"$\pm$", "Δ": r"$\Delta$",
                  "–": "--", "—": "---", "−": "$-$"}
_LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                   "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                   "^": r"\textasciicircum{}"}


def frames(table: Table) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The printed table (label columns, then value columns) and its bold marks.

    Columns are a two-level MultiIndex (group, name) when a header has a group
    (Table 1's "VOC SGD" over "L1", Table 6's λ0 / C blocks), else plain names.
    """
    headers = [("", label) for label in table.labels.columns]
    headers += [table.headers[c] for c in table.cells.columns]
    text = pd.concat([table.labels, table.cells], axis=1)
    bold = pd.concat([pd.DataFrame(False, index=table.labels.index, columns=table.labels.columns),
                      table.bold], axis=1)
    if any(group for group, _ in headers):
        columns = pd.MultiIndex.from_tuples(headers)
    else:
        columns = pd.Index([label for _, label in headers])
    text.columns = columns
    bold.columns = columns
    return text, bold


def _flat_header(column) -> str:
    if isinstance(column, tuple):
        group, label = column
        return f"{group} {label}" if group else label
    return column


def to_markdown(table: Table) -> str:
    text, bold = frames(table)
    n_labels = len(table.labels.columns)
    header = [_flat_header(c) for c in text.columns]
    lines = [f"### Table {table.number}. {table.title}", ""]
    lines.append("| " + " | ".join(_md_escape(h) for h in header) + " |")
    lines.append("| " + " | ".join(":---" if i < n_labels else "---:" for i in range(len(header)))
                 + " |")
    for row in range(len(text)):
        cells = []
        for value, strong in zip(text.iloc[row], bold.iloc[row]):
            value = _md_escape(str(value))
            cells.append(f"**{value}**" if strong and value else value)
        lines.append("| " + " | ".join(cells) + " |")
    lines += _md_list("Notes:", table.notes)
    lines += _md_list("Runs not in the table:", table.left_out)
    return "\n".join(lines) + "\n"


def _md_escape(text: str) -> str:
    return text.replace("|", r"\|")


def _md_list(title: str, items: list) -> list:
    if not items:
        return []
    return ["", title, ""] + [f"- {_md_escape(item)}" for item in items]


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters, then spell the tables' symbols in math mode."""
    escaped = "".join(_LATEX_SPECIALS.get(ch, ch) for ch in str(text))
    for symbol, latex in _LATEX_SYMBOLS.items():
        escaped = escaped.replace(symbol, latex)
    return escaped


def to_latex(table: Table) -> str:
    text, bold = frames(table)
    escaped = text.map(latex_escape)
    if isinstance(text.columns, pd.MultiIndex):
        columns = pd.MultiIndex.from_tuples([tuple(latex_escape(p) for p in c) for c in text.columns])
    else:
        columns = pd.Index([latex_escape(c) for c in text.columns])
    escaped.columns = columns
    marks = bold.map(lambda strong: "textbf: --rwrap;" if strong else "")
    marks.columns = columns
    n_labels = len(table.labels.columns)
    styler = escaped.style.hide(axis="index").apply(lambda _: marks, axis=None)
    latex = styler.to_latex(
        hrules=True,
        column_format="l" * n_labels + "r" * (len(columns) - n_labels),
        caption=latex_escape(table.title),
        label=f"tab:table{table.number}",
        position_float="centering",
        multicol_align="c",
        environment="table",
    )
    under = _latex_list("Notes:", table.notes) + _latex_list("Runs not in the table:", table.left_out)
    if under:
        latex = latex.replace("\\end{table}", "".join(under) + "\\end{table}")
    return "% Table {} of the ALWA paper, rebuilt by alwa-sweep report; needs \\usepackage{{booktabs}}\n{}".format(
        table.number, latex)


def _latex_list(title: str, items: list) -> list:
    if not items:
        return []
    lines = ["\\par\\smallskip{\\footnotesize ", latex_escape(title)]
    lines += [f"\\\\\n{latex_escape(item)}" for item in items]
    lines.append("\\par}\n")
    return lines
