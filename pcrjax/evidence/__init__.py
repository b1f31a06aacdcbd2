"""The evidence of a protocol run, computed from its predictions files alone.

Statistics, calibration, operating points, decision curves, tables, figures, the report and
comparisons of runs. Nothing here imports JAX, so a finished workdir can be re-reported anywhere.
"""
