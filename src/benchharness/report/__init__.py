"""Stage 8, report: run folders and the results store read back as tables, pages and plots.

Takes: run folders (or the store). Gives: report.md / report.html with statistics and plots
(`collect.py` computes, `tables.py` formats, `render.py` writes), and the leaderboard page.
Imports: every stage before it; nothing imports it but `run` and the command line.
"""
