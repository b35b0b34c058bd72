"""Render a ``reports.tables.Table``: GitHub Markdown, and LaTeX (booktabs).

The LaTeX is a ``table`` (or ``table*``) float holding one ``tabular``, scaled down to
the line when wider; it needs ``booktabs`` and ``graphicx``:
``\\documentclass{article}\\usepackage{booktabs,graphicx}\\begin{document}
\\input{table1.tex}\\end{document}`` compiles it without an overfull box.
"""

from __future__ import annotations

import re

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
        for position, (value, strong) in enumerate(zip(text.iloc[row], bold.iloc[row])):
            value = _md_escape(str(value))
            strong = strong or (position < n_labels and row in table.bold_labels)
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


_NEGATIVE = re.compile(r"(?<![\w.])-(?=\d)")

WIDTHS = ("text", "full")


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters, then spell the tables' symbols in math mode;
    a negative number gets a real minus sign (``$-$0.49``), not a hyphen."""
    escaped = "".join(_LATEX_SPECIALS.get(ch, ch) for ch in str(text))
    for symbol, latex in _LATEX_SYMBOLS.items():
        escaped = escaped.replace(symbol, latex)
    return _NEGATIVE.sub("$-$", escaped)


def _header_rows(table: Table) -> list[str]:
    """The group row (``\\multicolumn`` + ``\\cmidrule`` under each group) and the name row."""
    headers = [("", label) for label in table.labels.columns]
    headers += [table.headers[c] for c in table.cells.columns]
    names = " & ".join(latex_escape(label) for _, label in headers) + " \\\\"
    if not any(group for group, _ in headers):
        return [names]
    spans = []  # (group, first column, last column), 1-based
    for index, (group, _) in enumerate(headers, start=1):
        if spans and spans[-1][0] == group and group:
            spans[-1] = (group, spans[-1][1], index)
        else:
            spans.append((group, index, index))
    cells = [f"\\multicolumn{{{last - first + 1}}}{{c}}{{{latex_escape(group)}}}" if group else ""
             for group, first, last in spans]
    rules = " ".join(f"\\cmidrule(lr){{{first}-{last}}}" for group, first, last in spans if group)
    return [" & ".join(cells) + " \\\\", rules, names]


def to_latex(table: Table, width: str = "text") -> str:
    """A booktabs ``table`` (``width="text"``) or ``table*`` (``"full"``: both columns of a
    two-column page, in ``\\small``) that fits the line: the tabular is scaled down to
    ``\\linewidth`` when wider (never up), so no table overflows an ``article`` page.
    Needs ``\\usepackage{booktabs}`` and ``\\usepackage{graphicx}``."""
    if width not in WIDTHS:
        raise ValueError(f"width must be one of {WIDTHS}, got {width!r}")
    text, bold = frames(table)
    n_labels = len(table.labels.columns)
    n_columns = n_labels + len(table.cells.columns)
    environment = "table*" if width == "full" else "table"
    lines = [f"% Table {table.number} of the ALWA paper, rebuilt by alwa-sweep report; needs "
             "\\usepackage{booktabs} and \\usepackage{graphicx}",
             f"\\begin{{{environment}}}[htbp]", "\\centering"]
    if width == "full" or n_columns > 8:
        lines.append("\\small")
    lines += [f"\\caption{{{latex_escape(table.title)}}}", f"\\label{{tab:table{table.number}}}",
              "\\resizebox{\\ifdim\\width>\\linewidth\\linewidth\\else\\width\\fi}{!}{%",
              f"\\begin{{tabular}}{{{'l' * n_labels + 'r' * (n_columns - n_labels)}}}", "\\toprule"]
    lines += _header_rows(table)
    lines.append("\\midrule")
    for row in range(len(text)):
        cells = []
        for position, (value, strong) in enumerate(zip(text.iloc[row], bold.iloc[row])):
            value = latex_escape(value)
            strong = strong or (position < n_labels and row in table.bold_labels)
            cells.append(f"\\textbf{{{value}}}" if strong and value else value)
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}}"]
    under = _latex_list("Notes:", table.notes) + _latex_list("Runs not in the table:", table.left_out)
    if under:
        lines.append("".join(under).rstrip("\n"))
    lines.append(f"\\end{{{environment}}}")
    return "\n".join(lines) + "\n"


def _latex_list(title: str, items: list) -> list:
    if not items:
        return []
    lines = ["\\par\\smallskip{\\footnotesize ", latex_escape(title)]
    lines += [f"\\\\\n{latex_escape(item)}" for item in items]
    lines.append("\\par}\n")
    return lines
