"""A finished run in use: `packaging` writes it as a self-contained model directory, `serving`
predicts new patients with that directory."""
