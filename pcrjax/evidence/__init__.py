"""The evidence of a protocol run, computed from its predictions files alone.

Pure statistics (statistics, calibration, operating points, decision curves, the tables' numbers)
that read no run folder; `loading` reads a run's predictions files; figures, the report
(`run_report`) and comparisons of runs (`run_comparison`) on top. Nothing here imports JAX, so a
finished workdir can be re-reported anywhere.
"""
