"""Serving a finished run: export it as a model directory, predict new patients with it."""
