"""A search sweep's trials (``alwa_sweep/search.py``), best first.

``search.md``: one row per sampled trial — the sampled settings, the metric (× 100, as
the tables print it) and the status; the trials that did not finish are listed after
the ranked ones with their status. ``search.png``/``.pdf``: where the trials lie in the
first two sampled settings, coloured by the metric (log axes for log ranges are not
known here: an axis is log when its values span more than a factor of 10).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from reports import schema as S

SEARCH_COLUMN = S.TAG_PREFIX + S.TAG_SEARCH


def without_searches(trials: pd.DataFrame) -> pd.DataFrame:
    """The grid trials: what the paper's tables are built from."""
    return trials[trials[SEARCH_COLUMN].isna()] if SEARCH_COLUMN in trials else trials


def searches(trials: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The search trials among ``trials``, grouped by their sampled fields."""
    if SEARCH_COLUMN not in trials:
        return {}
    found = trials[trials[SEARCH_COLUMN].notna()]
    return {keys: frame for keys, frame in found.groupby(SEARCH_COLUMN, sort=True)}


def ranked(frame: pd.DataFrame, keys: list[str], metric_column: str, mode: str = "max") -> pd.DataFrame:
    """The trials with their sampled values (floats) and metric; finished ones first, best first."""
    out = pd.DataFrame({"name": frame["name"], "state": frame["state"]})
    for key in keys:
        out[key] = pd.to_numeric(frame.get(S.PARAM_PREFIX + key), errors="coerce")
    metric = frame[metric_column] if metric_column in frame else pd.Series(math.nan, index=frame.index)
    out["metric"] = pd.to_numeric(metric, errors="coerce").where(frame["state"] == S.STATUS_OK)
    out["finished"] = out["metric"].notna()
    out = out.sort_values(["finished", "metric"], ascending=[False, mode == "min"], kind="stable")
    return out.drop(columns="finished").reset_index(drop=True)


def to_markdown(keys: list[str], table: pd.DataFrame, metric: str) -> str:
    header = ["rank", "trial", *keys, f"{metric} (×100)", "status"]
    lines = [f"## Search over {', '.join(keys)}", "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" if i in (1, len(header) - 1) else "---:" for i in range(len(header))) + "|"]
    for rank, (_, row) in enumerate(table.iterrows(), 1):
        values = [f"{row[key]:.4g}" for key in keys]
        finished = not math.isnan(row["metric"])
        score = f"{row['metric'] * 100:.1f}" if finished else "–"
        lines.append("| " + " | ".join([str(rank) if finished else "", str(row["name"]), *values, score,
                                        str(row["state"])]) + " |")
    finished = table["metric"].notna().sum()
    lines += ["", f"{finished} of {len(table)} trials finished with a {metric}."]
    if finished:
        best = table.iloc[0]
        lines.append("Best: " + ", ".join(f"{k} = {best[k]:.4g}" for k in keys) + f" ({metric} {best['metric'] * 100:.1f}).")
    return "\n".join(lines) + "\n"


def figure(keys: list[str], table: pd.DataFrame, metric: str, out_dir: Path, stem: str = "search") -> list[Path]:
    """The trials in the plane of the first two sampled settings (one setting: against
    the metric), coloured by the metric; unfinished trials as grey crosses."""
    from matplotlib.figure import Figure

    from reports.figures import save

    done = table[table["metric"].notna()]
    rest = table[table["metric"].isna()]
    fig = Figure(figsize=(5.0, 4.0))
    ax = fig.add_subplot()
    x = keys[0]
    y = keys[1] if len(keys) > 1 else "metric"
    points = ax.scatter(done[x], done[y] * (100 if y == "metric" else 1), c=done["metric"] * 100,
                        cmap="viridis", s=40, edgecolors="black", linewidths=0.5)
    if len(rest) and y != "metric":
        ax.scatter(rest[x], rest[y], marker="x", color="grey", label="not finished")
        ax.legend(loc="best", fontsize=8)
    if len(done):
        best = done.iloc[0]
        ax.scatter([best[x]], [best[y] * (100 if y == "metric" else 1)], marker="*", s=220, color="red",
                   label="best", zorder=3)
        fig.colorbar(points, ax=ax, label=f"{metric} (×100)")
    for axis, key in (("x", x), ("y", y)):
        values = table[key].dropna()
        if key != "metric" and len(values) and values.min() > 0 and values.max() / values.min() > 10:
            getattr(ax, f"set_{axis}scale")("log")
    ax.set_xlabel(x)
    ax.set_ylabel(f"{metric} (×100)" if y == "metric" else y)
    ax.set_title(f"search: {len(done)} of {len(table)} trials finished")
    return save(fig, out_dir, stem)
