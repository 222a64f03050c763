"""Analysis of finished or running searches (installed as stain_search.analysis).

- :mod:`~stain_search.analysis.load` — a search as a tidy pandas frame (trial × epoch), Parquet.
- :mod:`~stain_search.analysis.importance` — fANOVA / PED-ANOVA importance, effect directions.
- :mod:`~stain_search.analysis.flags` — structure lost while realism improved; mode collapse.
- :mod:`~stain_search.analysis.samples` — top trials' generators on the same validation tiles.
- :mod:`~stain_search.analysis.plots` — the figures (matplotlib, PNG).
- :mod:`~stain_search.analysis.report` — `stain-search report NAME`: one self-contained HTML page.
"""
