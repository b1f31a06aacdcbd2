"""Synthetic predictions whose calibration is known, shared by the evidence tests."""

import numpy as np
from scipy.special import expit


def calibrated(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """True logits ~ N(0, 1.5²) and labels y ~ Bernoulli(σ(logit)): σ(logit) is calibrated."""
  rng = np.random.default_rng(seed)
  true_logit = rng.normal(0.0, 1.5, n)
  return rng.random(n) < expit(true_logit), true_logit
