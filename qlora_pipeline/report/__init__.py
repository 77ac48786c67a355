"""The report: one module per section of report.md (sections.py lists them), each of the same
shape: its files read into rows, the rows shown as a table, and maybe a CSV and a plot."""
