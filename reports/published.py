"""The paper's published numbers (``reports/paper/*.csv``) and the ``--paper`` columns.

Named ``published`` because ``reports.paper`` is the package that ships the CSVs.

Each table's numbers come back keyed the way ``reports.tables`` keys its cells
(``Table.keys``), so a published number is found by what the cell means, not where
it is printed. Table 1's rows other than (1.00,1.00) are deltas, as in the paper and
as ``reports.tables.table1`` prints them.
"""

from __future__ import annotations

import math
from importlib import resources

import pandas as pd

from reports.tables import BACKBONES, DETECTORS, LOSSES, MISSING, Table, format_number

FILES = {
    1: "table1_loss_weight_grid.csv", 2: "table2_voc_alwa.csv",
    3: "table3_voc_other_detectors.csv", 4: "table4_other_balancers.csv",
    5: "table5_coco.csv", 6: "table6_ablation.csv",
}
_LOSS_KEYS = {"l1": "l1", "smoothl1": "smooth_l1", "ciou": "ciou", "giou": "giou", "diou": "diou"}
_APPROACH_KEYS = {"baseline": "baseline", "guided loss": "guided", "dwa": "dwa", "dtp": "dtp",
                  "alwa_1": "alwa_1", "alwa_2": "alwa_2"}


def read_csv(number: int) -> pd.DataFrame:
    """The paper's Table ``number`` as printed, every cell a string."""
    source = resources.files("reports.paper").joinpath(FILES[number])
    with source.open("r", encoding="utf-8") as handle:
        return pd.read_csv(handle, dtype=str, keep_default_na=False)


def _key_of(names: dict, shown: str) -> str:
    reverse = {v.lower(): k for k, v in names.items()}
    return reverse.get(shown.lower(), shown.lower())


def _number(text: str):
    """A float, or the printed word for a diverged run (``nan`` / ``overflow``)."""
    return text if text in ("nan", "overflow") else float(text)


def _loss(column: str) -> str:
    return _LOSS_KEYS[column.lower()]


def published(number: int) -> dict:
    """Cell key (as in ``Table.keys``) -> published number (float, or ``nan``/``overflow``)."""
    frame = read_csv(number)
    values = {}
    for _, row in frame.iterrows():
        if number == 1:
            weights = (round(float(row["rpn_cls_weight"]), 4), round(float(row["rpn_reg_weight"]), 4))
            for column in frame.columns[2:]:
                dataset, optimizer, loss = column.split("_", 2)
                values[(*weights, f"{dataset}_{optimizer}_{_loss(loss)}")] = _number(row[column])
        elif number == 2:
            block = (_key_of(DETECTORS, row["detector"]), _key_of(BACKBONES, row["backbone"]),
                     _APPROACH_KEYS[row["method"].lower()])
            for column in frame.columns[3:]:
                values[(*block, _loss(column))] = _number(row[column])
        elif number == 3:
            for column in frame.columns[1:]:
                values[(_key_of(DETECTORS, row["detector"]), _APPROACH_KEYS[column.lower()])] = \
                    _number(row[column])
        elif number == 4:
            for column in frame.columns[1:]:
                values[(_APPROACH_KEYS[row["approach"].lower()], column)] = _number(row[column])
        elif number == 5:
            setting = (_key_of(DETECTORS, row["detector"]), _key_of(LOSSES, row["reg_loss"]),
                       _key_of(BACKBONES, row["backbone"]))
            for column in frame.columns[3:]:
                values[(*setting, _APPROACH_KEYS[column.lower()])] = _number(row[column])
        else:
            for column in frame.columns[2:]:
                values[(row["parameter"], float(row["value"]), _loss(column))] = _number(row[column])
    return values


def with_paper(table: Table) -> Table:
    """The table with, after each measured column, the paper's number and measured − paper."""
    paper = published(table.number)
    cells, values, bold, keys = {}, {}, {}, {}
    headers, decimals = {}, {}
    for column in table.cells.columns:
        group, label = table.headers[column]
        cells[column], values[column] = table.cells[column], table.values[column]
        bold[column], keys[column] = table.bold[column], table.keys[column]
        headers[column], decimals[column] = (group, label), table.decimals.get(column)
        # (not Series.map: it turns the None of a row the paper lacks into NaN, printed "+nan")
        published_here = pd.Series([None if key is None else paper.get(key)
                                    for key in table.keys[column]], index=table.cells.index, dtype=object)
        if all(number is None for number in published_here):
            continue  # a column the paper has no numbers for (the C labels, extra losses)
        places = table.decimals[column]
        paper_text, difference_text, difference = [], [], []
        for row, number in published_here.items():
            signed = row in table.signed_rows
            measured = table.values.at[row, column]
            if number is None:
                paper_text.append(MISSING)
            elif isinstance(number, str):
                paper_text.append(number)
            else:
                paper_text.append(format_number(number, places, signed))
            if isinstance(number, float) and not math.isnan(measured):
                difference.append(measured - number)
                difference_text.append(format_number(measured - number, places, signed=True))
            else:
                difference.append(math.nan)
                difference_text.append(MISSING)
        for suffix, text, numbers, title in (
                ("paper", paper_text, published_here.map(_as_float), f"{label} paper"),
                ("delta", difference_text, difference, f"{label} Δ paper")):
            extra = f"{column}:{suffix}"
            cells[extra] = pd.Series(text, index=table.cells.index)
            values[extra] = pd.Series(numbers, index=table.cells.index, dtype=float)
            bold[extra] = pd.Series(False, index=table.cells.index)
            keys[extra] = pd.Series(None, index=table.cells.index, dtype=object)
            headers[extra], decimals[extra] = (group, title), places
    notes = list(table.notes)
    if table.off_paper:
        notes.append("Not comparable to the paper's numbers: these runs use "
                     + "; ".join(table.off_paper) + ", which no experiment of the paper did "
                     "(ResNet-50/101, 12 epochs, λ0 and C of Table 6). The Δ paper columns "
                     "show how far a demo is from the paper, not a reproduction error.")
    notes.append("Paper columns: – where the paper has no such cell; nan / overflow where its "
                 "run diverged.")
    return Table(
        number=table.number, title=table.title + "; beside each column the paper's number "
        "and measured − paper", labels=table.labels, cells=pd.DataFrame(cells),
        values=pd.DataFrame(values), bold=pd.DataFrame(bold), keys=pd.DataFrame(keys),
        headers=headers, decimals=decimals, signed_rows=table.signed_rows, notes=notes,
        left_out=table.left_out, n_runs=table.n_runs, bold_labels=table.bold_labels,
        off_paper=table.off_paper)


def _as_float(number) -> float:
    return number if isinstance(number, float) else math.nan
