"""Reports: the paper's tables and figures, rebuilt from alwa-sweep's MLflow runs.

``runs`` reads MLflow into pandas, ``tables`` builds Tables 1–6, ``render`` writes them
as Markdown / LaTeX, ``published`` holds the paper's numbers (the CSVs in ``paper/``),
``figures`` draws the plots.
"""
