"""A synthetic longitudinal breast DCE-MRI phantom with I-SPY2-like response biology.

Pure NumPy/SciPy (no TensorFlow, no JAX).  Each patient is a deterministic function of
``(spec.seed, index)`` only: every random draw comes from ``np.random.SeedSequence([seed,
index])`` and its spawned children, so a patient depends neither on the cohort size nor on the
generation order (parallel / resumed TFDS builds give identical examples).

What it is: a caricature that a breast-MRI physicist should recognise, not noise with a label.

* **Anatomy** (physical millimetres; axes ``(z, y, x)`` = (slice: inferior->superior,
  row: anterior->posterior, column), voxel centres symmetric about 0).  Geometry is drawn in
  mm (the spacing sets resolution, not anatomical scale), but textures are drawn on the voxel
  grid and breast, tumour position (and, in slabs too thin to hold it, tumour size) are fitted
  to the field of view: a patient is reproducible for the same spec geometry and seed.
  One breast: the anterior half of an ellipsoid resting on a slightly curved chest wall
  (``y_cw(x) = y0 + k (x - x_c)^2``), a 1-2 mm skin shell, a pectoralis muscle band (7-14 mm)
  behind the chest wall, a dim thorax (ribs/lung) behind it and air (no protons) everywhere
  else.  Fibroglandular tissue (FGT) is thresholded, smoothed Gaussian noise (5 mm kernel),
  biased towards the central breast, kept out of a subcutaneous (3-9 mm) and a retromammary
  (3-8 mm) fat layer; soft thresholding gives FGT/fat partial volume.  Breast size, shape and
  density (BI-RADS a-d, 4-70 % FGT) vary from patient to patient.
* **Tumour**: star-shaped, ``r(u) = s * A * exp(f(u))`` in a randomly rotated, anisotropic
  (axis ratios ~ exp N(0, 0.15)) frame, where ``f`` is a zero-mean sum of 8 low-frequency
  random cosines on the unit sphere (frequency 1.5-3.5, i.e. spherical-harmonic degree
  <~ 4; lobulation amplitude 0.12-0.30 in log radius) plus, in 30 %, a weak high-frequency
  'spiculation' term.  Sphere-equivalent diameter at T0 10-40 mm, median 24 mm (longest
  diameter median ~ 33 mm, up to ~ 50 mm; I-SPY2 enrols tumours >= 2.5 cm clinically),
  slightly larger in triple negatives.  Enhancement is heterogeneous: Ktrans rises from core to
  rim (0.6 + 0.8 r^2), has a tumour-attached texture ``exp(a * tex)`` (``tex``: unit-variance
  random Fourier features, 6-14 mm wavelength; amplitude a = 0.3 unless the transfer knob
  below sets it), and larger tumours (more often TNBC) have a necrotic core
  (Ktrans x 0.04, ve 0.6, T1 1.8 s).  The tumour shrinks concentrically by visit.
* **Contrast kinetics**: extended Tofts model ``C = vp Cp + Ktrans * (Cp conv exp(-kep t))``,
  ``kep = Ktrans / ve``, with the Parker et al. (MRM 2006;56:993) population AIF
  (A1 = 0.809 mM min, A2 = 0.330 mM min, T1 = 0.17046 min, T2 = 0.365 min, sigma1 = 0.0563,
  sigma2 = 0.132 min, alpha = 1.050 mM, beta = 0.1685 /min, s = 38.078 /min, tau = 0.483 min),
  plasma = blood / (1 - Hct), Hct = 0.45, and a per-patient bolus arrival delay of 2-10 s.
  The convolution is tabulated once per visit on 160 log-spaced kep values (trapezoid rule,
  0.5 s steps, only at the two post-contrast sample times) and interpolated per voxel in
  log kep: within 0.15 % of a brute-force convolution, and fully vectorised.
  ``R1 = 1/T10 + r1 C`` with r1 = 4.5 /mM/s (typical gadolinium agent in plasma at 1.5-3 T,
  Rohrer et al., Invest Radiol 2005;40:715), and the spoiled gradient-echo signal
  ``S = M0 sin(a) (1 - E1) / (1 - cos(a) E1)``, ``E1 = exp(-TR R1)`` with the QIBA DCE DRO
  acquisition TR = 5 ms, flip angle 30 deg (QIBA DCE-MRI profile / Barboriak DRO).
  Pre-contrast T1: fat 0.38 s and FGT 1.2 s (Rakow-Penner et al., JMRI 2006;23:87: 3 T fat
  367 ms, glandular 1445 ms; 1.5 T 296 / 1266 ms), tumour 1.0 s (invasive carcinoma
  ~0.9-1.2 s at 1.5-3 T), pectoralis muscle 1.0 s (Stanisz et al., MRM 2005: 1.0 s at 1.5 T),
  skin 1.0 s, necrosis 1.8 s; +-8 % per patient.  Relative proton densities (assumed): fat 1.0,
  FGT 0.9, tumour 0.95, necrosis 1.0, muscle 0.85, skin 0.85, thorax 0.2.
  Kinetic parameters: fat none; FGT background parenchymal enhancement (BPE) Ktrans
  0.003 / 0.006 / 0.011 / 0.018 /min for minimal / mild / moderate / marked BPE
  (35/35/20/10 %), ve 0.3, vp 0.003, voxel log-normal spread 0.35, reduced by chemotherapy
  at later visits -> early PE mostly 10-50 %, progressive (SER < 1); muscle Ktrans 0.015-0.03,
  ve 0.12 (PE ~ 40 %, plateau); tumour mean Ktrans 0.10-0.40 /min (median 0.15 for HR+/HER2-,
  0.21-0.22 otherwise), ve 0.25-0.60 (0.35-0.75 for HR+/HER2-: lower kep), vp 0.02-0.08 ->
  early PE ~ 150-300 %; with the Parker AIF and a 450-s late phase most tumours wash out
  (tumour-mean SER ~ 1.0-1.9, median ~ 1.45; rims wash out, cores and luminal tumours tend
  to plateau).
* **Fat suppression**: I-SPY2 DCE is acquired fat suppressed, and its background threshold
  (S0 >= 0.6 x 95th percentile) only works if fat is darker than FGT and tumour.  Fat keeps a
  residual 10-22 % of its SPGR signal (imperfect spectral saturation); fat does not enhance,
  so PE in fat is ~ 0 regardless.  (The QIBA DRO itself has no fat.)
* **Acquisition**: sample times pre = 0 s (before injection), early 120-180 s, late 400-500 s
  (UCSF convention: phases nearest 150 s and 450 s), drawn per visit and returned as
  ``phase_times_s``.  Gaussian point-spread function (sigma 0.5 voxel) for partial volume;
  smooth multiplicative coil-sensitivity bias field (exp of a random quadratic polynomial,
  peak deviation 10-20 %, times a per-visit receiver gain 0.9-1.1), the same for the three
  phases of a visit and redrawn per visit; rigid misregistration of 1-3 mm per follow-up visit
  (T0 is the reference; anatomy, tumour and mask move together); global scale so that FGT
  reads ~ 250-700, enhancing tumour ~ 1000-3000 and nothing exceeds ~ 25 000 (float16 safe);
  Rician noise ``|S + n_re + i n_im|`` with sigma set by a fat SNR of 20-40 (so air is a
  positive Rician floor ~ 1.25 sigma and nothing is negative).
* **Cohort biology (I-SPY2-like)**: subtype prevalence HR+/HER2- 40 %, HR+/HER2+ 15 %,
  HR-/HER2+ 10 %, HR-/HER2- 35 %; pCR rates 18 / 35 / 65 / 40 % (overall ~ 33 %; I-SPY2
  ~ 32 %).  A latent response ``r`` in [0, 1] is Beta(5, 2) for pCR and Beta(2, 4) otherwise
  (overlapping).  Log tumour-volume ratios vs T0:
  T1 (3 weeks): ``0.02 - 0.30 r + N(0, 0.15)`` (mean change ~ -10 %, small and noisy);
  T2 (12 weeks): ``0.45 - 3.6 r + N(0, 0.55)``; T3 (pre-surgery): pCR -> no tumour (empty
  mask), non-pCR -> T2 value ``- 0.8 r - 0.1 + N(0, 0.3)`` and at least 150 mm^3 of
  enhancing residual disease (non-pCR tumours are never below 150 mm^3; a pCR tumour below
  100 mm^3 at T2 has already vanished).  Mean tumour Ktrans falls as
  ``exp(-lambda r + noise)``, lambda = 0.25 / 1.0 / 1.3 at T1/T2/T3, floor 0.07 /min.
  Baseline Ktrans correlates weakly with response (log K0 += 0.15 (r - 0.5)): more vascular
  tumours respond slightly better.  Tuned so that the AUROC of the T1 volume change is
  ~ 0.7 and of the T2 change ~ 0.87 (``python -m tfds_ispy2.ispy2.phantom`` prints them).
* **Transfer knob** (``PhantomSpec.transfer``, 0 by default, in [0, 1]): a positive control
  for learning from the later visit.  Without it, pCR is drawn first and T1 and T2 follow from
  ``r`` plus noise, so what T0/T1 predict of the T2 change carries nothing beyond the label.
  With it, a per-patient intratumoral kinetic heterogeneity ``h ~ N(0, 1)`` (its own random
  stream) is visible at every visit only as the spatial pattern of enhancement, the texture
  amplitude ``a = clip(0.3 exp(0.4 transfer h), 0.1, 0.7)`` (patchier enhancement; given pCR,
  the tumour volume and mean Ktrans at T0/T1 do not depend on ``h``, up to < 1 % of mean Ktrans
  from hot spots capped at 1 /min), and it sets the later response: the T2 log-volume ratio
  gains ``-0.7 transfer h`` (T3 follows T2; added after the tumour is fitted to the field of
  view, and where the slab cannot hold the extra growth, growth stops at the fitted bound: ~ 7 %
  of patients) and pCR is drawn with the same uniform draw against
  ``sigmoid(a_s + 0.9 transfer h)``, ``a_s`` calibrated so that each subtype's pCR rate is
  unchanged.  At transfer = 1 (500 patients, seed 0, the ``synthetic`` geometry): ``h`` explains
  40 % of the variance of the T2 log-volume change, the T0/T1 truth (volume, Ktrans, their T1
  changes, subtype) 19 % without ``h`` and 53 % with it (5-fold cross-validated); ``h`` alone
  has an AUROC for pCR of 0.69; the pCR rate stays 0.32.  A caricature of reports that
  heterogeneous enhancement predicts response (see ``README.md``).  At 0 the cohort is
  byte-identical to the one without the knob.
* **Missing visits**: T1 5 %, T2 8 %, T3 10 % (independent); T0 always present.  A missing
  visit has all-zero images, mask and phase times.
* **Arms**: metadata only (no effect on response); HER2-targeted arms only for HER2+.

Public API: :class:`PhantomSpec`, :class:`PatientTruth`, :func:`patient_id`,
:func:`simulate_patient`, :func:`log_volume_change`, :func:`render_patient` (the TFDS example,
laid out as in ``schema.py``: visits, phases and subtype ids), :func:`render_example` (the example
and its :func:`oracle_truth`, what a build writes) and :func:`render_patient_maps` (the example plus
tissue labels and parameter maps, for validating biomarkers).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types

import numpy as np
from scipy import ndimage, optimize

from tfds_ispy2.ispy2 import schema

__all__ = [
    'ARMS_HER2_NEGATIVE',
    'ARMS_HER2_POSITIVE',
    'LABELS',
    'PhantomSpec',
    'PatientTruth',
    'patient_id',
    'log_volume_change',
    'simulate_patient',
    'render_patient',
    'render_example',
    'render_patient_maps',
    'oracle_truth',
    'ORACLE_TRUTH',
    'parker_aif_plasma',
    'tofts_concentration',
    'spgr_signal',
]

ARMS_HER2_NEGATIVE = (
    'Paclitaxel',
    'Paclitaxel + Pembrolizumab',
    'Paclitaxel + MK-2206',
    'Paclitaxel + Ganitumab',
    'Paclitaxel + Veliparib + Carboplatin',
)
ARMS_HER2_POSITIVE = (
    'Paclitaxel + Trastuzumab',
    'Paclitaxel + Neratinib',
    'Paclitaxel + MK-2206 + Trastuzumab',
    'Paclitaxel + Trastuzumab + Pertuzumab',
    'T-DM1 + Pertuzumab',
)

# Tissue label codes of :func:`render_patient_maps`.
LABELS = {
    'air': 0,
    'fat': 1,
    'fgt': 2,
    'tumour': 3,
    'necrosis': 4,
    'skin': 5,
    'muscle': 6,
    'thorax': 7,
}

# ----------------------------------------------------------------------------- constants
SUBTYPE_PREVALENCE = np.array([0.40, 0.15, 0.10, 0.35])
PCR_RATE = np.array([0.18, 0.35, 0.65, 0.40])
MISSING_RATE = np.array([0.0, 0.05, 0.08, 0.10])  # per visit; T0 never missing
VISIT_DAY_MEAN = np.array([0.0, 21.0, 84.0, 168.0])
VISIT_DAY_SD = np.array([0.0, 3.0, 7.0, 14.0])

# Acquisition (QIBA DCE DRO) and contrast agent.
TR_S = 5e-3
FLIP_DEG = 30.0
R1_PER_MM_S = 4.5
HCT = 0.45
# Parker et al. 2006 population AIF (blood), t in minutes, concentrations in mM.
PARKER = dict(
    A1=0.809,
    A2=0.330,
    T1=0.17046,
    T2=0.365,
    sigma1=0.0563,
    sigma2=0.132,
    alpha=1.050,
    beta=0.1685,
    s=38.078,
    tau=0.483,
)

# Pre-contrast T1 (s) and relative proton density per tissue.
T10_S = dict(
    fat=0.38,
    fgt=1.2,
    tumour=1.0,
    necrosis=1.8,
    muscle=1.0,
    skin=1.0,
    thorax=1.2,
)
M0_REL = dict(
    fat=1.0,
    fgt=0.9,
    tumour=0.95,
    necrosis=1.0,
    muscle=0.85,
    skin=0.85,
    thorax=0.2,
)

# Background parenchymal enhancement levels (Ktrans /min), probabilities.
BPE_KTRANS = np.array([0.003, 0.006, 0.011, 0.018])
BPE_PROB = np.array([0.35, 0.35, 0.20, 0.10])
# Chemotherapy suppresses BPE (multiplicative factor per visit).
BPE_VISIT_FACTOR = np.array([1.0, 0.9, 0.7, 0.6])
# BI-RADS density a-d: probabilities and FGT volume-fraction ranges.
DENSITY_PROB = np.array([0.10, 0.40, 0.40, 0.10])
DENSITY_RANGE = np.array(
    [[0.04, 0.10], [0.10, 0.25], [0.25, 0.50], [0.50, 0.70]]
)

# Tumour baseline by subtype: median Ktrans (/min), median sphere-equivalent diameter (mm),
# probability of a necrotic core when the tumour is > 20 mm.
TUMOUR_KTRANS_MEDIAN = np.array([0.15, 0.21, 0.22, 0.21])
TUMOUR_VE_RANGE = np.array(
    [[0.35, 0.75], [0.25, 0.60], [0.25, 0.60], [0.25, 0.60]]
)
TUMOUR_DIAMETER_MEDIAN = np.array([24.0, 24.0, 24.0, 26.0])
NECROSIS_PROB = np.array([0.15, 0.25, 0.30, 0.55])

# Response model (log volume ratio vs T0 = a + b r + N(0, sd)).
RESPONSE_BETA = dict(pcr=(5.0, 2.0), non_pcr=(2.0, 4.0))
LOGVOL_T1 = (0.02, -0.30, 0.15)
LOGVOL_T2 = (0.45, -3.6, 0.55)
LOGVOL_T3 = (-0.10, -0.8, 0.30)  # added to the T2 value, non-pCR only
LOGK_LAMBDA = np.array([0.0, 0.25, 1.0, 1.3])
LOGK_SD = np.array([0.0, 0.12, 0.25, 0.25])
KTRANS_FLOOR = 0.07
# Tumour Ktrans texture amplitude (log scale): 0.3 by default; with the transfer knob
# 0.3 exp(transfer * TRANSFER_TEXTURE * h), clipped to TEXTURE_AMPLITUDE_RANGE.
TEXTURE_AMPLITUDE = 0.3
TEXTURE_AMPLITUDE_RANGE = (0.1, 0.7)
# Transfer knob (see PhantomSpec.transfer): slopes on the heterogeneity h ~ N(0, 1).
TRANSFER_TEXTURE = 0.4  # log texture amplitude per unit h
TRANSFER_LOGVOL_T2 = 0.7  # extra T2 log-volume shrinkage per unit h
TRANSFER_PCR_LOGIT = 0.9  # pCR log-odds per unit h
MIN_RESIDUAL_MM3 = 150.0  # non-pCR tumours never fall below this
VANISH_MM3 = 100.0  # a pCR tumour below this at T2 has disappeared on imaging

_N_SHAPE = 8  # random cosines of the lobulation field
_N_TEXTURE = 12  # random Fourier features of the tumour texture
_N_BIAS = 9  # quadratic bias-field terms
_FGT_SMOOTH_MM = 5.0
_PSF_SIGMA_VOX = 0.5


# ----------------------------------------------------------------------------- public types
@dataclasses.dataclass(frozen=True)
class PhantomSpec:
  """Cohort/geometry specification; a patient depends on (seed, index) and the geometry.

  ``transfer`` in [0, 1] is the mechanism knob of the module docstring: how strongly a
  heterogeneity visible at T0/T1 only as enhancement texture sets T2 shrinkage and pCR.  At 0
  (the default) the cohort is exactly the one without the knob.
  """

  num_patients: int = 256
  shape: tuple[int, int, int] = (16, 64, 64)  # D (slices), H, W voxels
  spacing_mm: tuple[float, float, float] = (3.0, 2.0, 2.0)
  seed: int = 0
  transfer: float = 0.0

  def __post_init__(self):
    if not 0.0 <= self.transfer <= 1.0:
      raise ValueError(f'transfer must lie in [0, 1], got {self.transfer}')


@dataclasses.dataclass(frozen=True, eq=False)
class PatientTruth:
  """Ground truth of one synthetic patient (all random draws; no voxel arrays).

  Per-visit arrays have length 4 (T0..T3); entries of missing visits are 0.  Lengths in mm,
  positions in the centred scanner frame of :class:`PhantomSpec` (z, y, x), y posterior.
  """

  patient_id: str
  pcr: int
  subtype: int
  arm: str
  response: float  # latent response in [0, 1]
  heterogeneity: float  # kinetic heterogeneity h ~ N(0, 1); 0 when transfer = 0
  visit_mask: np.ndarray  # bool [4]
  tumor_volume_mm3: np.ndarray  # float [4], 0 where absent or missing visit
  ktrans_per_min: (
      np.ndarray
  )  # float [4], mean tumour Ktrans per visit (0 if absent)
  phase_times_s: np.ndarray  # float32 [4, 3]
  shift_mm: np.ndarray  # float [4, 3] rigid translation applied per visit
  # --- anything else needed to render.
  visit_days: np.ndarray  # float [4]
  tumor_ve: float
  tumor_vp: float
  tumor_center_mm: np.ndarray  # [3] at T0 (unshifted)
  tumor_axes_mm: np.ndarray  # [3] T0 semi-axes of the un-lobulated ellipsoid
  tumor_rotation: np.ndarray  # [3, 3] local -> scanner
  tumor_scale: np.ndarray  # float [4] linear scale vs T0 (0 if absent)
  shape_dirs: np.ndarray  # [_N_SHAPE, 3]
  shape_freqs: np.ndarray  # [_N_SHAPE]
  shape_phases: np.ndarray  # [_N_SHAPE]
  shape_amps: np.ndarray  # [_N_SHAPE] (already normalised: f has mean 0)
  shape_offset: float  # subtracted so that f has zero mean on the sphere
  texture_k: np.ndarray  # [_N_TEXTURE, 3] wave vectors (rad/mm)
  texture_phases: np.ndarray  # [_N_TEXTURE]
  texture_amplitude: (
      float  # log-Ktrans texture amplitude (TEXTURE_AMPLITUDE at h = 0)
  )
  necrosis_fraction: float  # normalised core radius (0: no necrosis)
  breast_center_mm: np.ndarray  # [3] (z, y on chest wall at x_c, x)
  breast_axes_mm: np.ndarray  # [3] (a_z, a_y depth, a_x)
  chest_wall_y_mm: float
  chest_wall_x_mm: float
  chest_wall_curvature: float  # 1/mm
  muscle_mm: float
  skin_mm: float
  subcutaneous_fat_mm: float
  retromammary_fat_mm: float
  fgt_density: float  # target FGT volume fraction of the breast
  bpe_ktrans_per_min: np.ndarray  # float [4]
  muscle_ktrans_per_min: float
  t10_scale: float  # multiplies all T10 values
  fat_residual: float  # fat-suppression residual fraction
  gain: float  # global scale of M0
  snr_fat: float
  noise_sigma: float
  bolus_delay_s: float
  bias_coeffs: np.ndarray  # [4, _N_BIAS]
  bias_amplitude: np.ndarray  # [4] peak fractional deviation
  visit_gain: np.ndarray  # [4]


# The key of the dataset's metadata (tfds.core.MetadataDict, metadata.json beside the records) under
# which a build writes every patient's `oracle_truth`, by patient id.
ORACLE_TRUTH = 'oracle_truth'


def patient_id(index: int) -> str:
  """De-identified patient id; carries nothing but the index."""
  return f'SYN-{int(index):05d}'


def log_volume_change(t: PatientTruth, visit: int) -> float:
  """True log(V_visit / V_T0); a vanished tumour counts as VANISH_MM3 (the least imaging shows,
  which keeps a complete response finite), NaN for a missing visit."""
  if not t.visit_mask[visit]:
    return math.nan
  return math.log(
      max(float(t.tumor_volume_mm3[visit]), VANISH_MM3) / t.tumor_volume_mm3[0]
  )


# ----------------------------------------------------------------------------- physics
def parker_aif_plasma(t_min: np.ndarray) -> np.ndarray:
  """Parker 2006 population AIF converted to plasma (mM); 0 before injection (t < 0)."""
  p = PARKER
  t = np.asarray(t_min, dtype=np.float64)
  g1 = (
      p['A1']
      / (p['sigma1'] * math.sqrt(2 * math.pi))
      * np.exp(-((t - p['T1']) ** 2) / (2 * p['sigma1'] ** 2))
  )
  g2 = (
      p['A2']
      / (p['sigma2'] * math.sqrt(2 * math.pi))
      * np.exp(-((t - p['T2']) ** 2) / (2 * p['sigma2'] ** 2))
  )
  sig = (
      p['alpha']
      * np.exp(-p['beta'] * t)
      / (1.0 + np.exp(-p['s'] * (t - p['tau'])))
  )
  return np.where(t >= 0, (g1 + g2 + sig) / (1.0 - HCT), 0.0)


_KEP_GRID = np.geomspace(1e-4, 50.0, 160)  # /min
_LOG_KEP_GRID = np.log(_KEP_GRID)


def _tofts_tables(times_s: np.ndarray, delay_s: float):
  """Cp(t) and I(t; kep) = int_0^t Cp(u) exp(-kep (t - u)) du on the kep grid.

  Returns (cp [n_t], table [n_t, n_kep]) in mM and mM*min.  Trapezoid rule on 0.5 s steps.
  """
  cps, tables = [], []
  for time in np.atleast_1d(times_s):
    t = (float(time) - delay_s) / 60.0
    if t <= 0:
      cps.append(0.0)
      tables.append(np.zeros_like(_KEP_GRID))
      continue
    n = int(math.ceil(t / (0.5 / 60.0))) + 1
    u = np.linspace(0.0, t, n)
    w = np.full(n, u[1] - u[0])
    w[0] = w[-1] = 0.5 * (u[1] - u[0])
    f = parker_aif_plasma(u) * w
    kern = np.exp(-np.outer(_KEP_GRID, t - u))
    tables.append(kern @ f)
    cps.append(float(parker_aif_plasma(t)))
  return np.asarray(cps), np.stack(tables)


def tofts_concentration(
    times_s, ktrans, ve, vp, delay_s: float = 0.0
) -> np.ndarray:
  """Extended Tofts tissue concentration (mM) at ``times_s`` (s after injection).

  ``ktrans`` (/min), ``ve``, ``vp`` broadcast together; returns shape ``[n_t, *broadcast]``.
  """
  ktrans, ve, vp = np.broadcast_arrays(
      np.asarray(ktrans, np.float64),
      np.asarray(ve, np.float64),
      np.asarray(vp, np.float64),
  )
  cp, table = _tofts_tables(np.asarray(times_s, np.float64), delay_s)
  kep = np.where(ktrans > 0, ktrans / np.maximum(ve, 1e-3), _KEP_GRID[0])
  logk = np.log(np.clip(kep, _KEP_GRID[0], _KEP_GRID[-1])).ravel()
  out = np.empty((len(cp),) + ktrans.shape)
  for i in range(len(cp)):
    conv = np.interp(logk, _LOG_KEP_GRID, table[i]).reshape(ktrans.shape)
    out[i] = vp * cp[i] + ktrans * conv
  return out


def spgr_signal(m0, t1_s, conc_mm=0.0):
  """Spoiled gradient echo signal for R1 = 1/T1 + r1 C (TR 5 ms, flip 30 deg)."""
  a = math.radians(FLIP_DEG)
  r1 = 1.0 / t1_s + R1_PER_MM_S * conc_mm
  e1 = np.exp(-TR_S * r1)
  return m0 * math.sin(a) * (1.0 - e1) / (1.0 - math.cos(a) * e1)


# ----------------------------------------------------------------------------- geometry helpers
@functools.lru_cache(maxsize=1)
def _fibonacci_sphere(n: int = 2000) -> np.ndarray:
  i = np.arange(n) + 0.5
  z = 1.0 - 2.0 * i / n
  r = np.sqrt(1.0 - z * z)
  phi = math.pi * (3.0 - math.sqrt(5.0)) * i
  return np.stack([z, r * np.sin(phi), r * np.cos(phi)], axis=-1)


def _shape_field(u, dirs, freqs, phases, amps, offset):
  """Zero-mean log-radius modulation f(u) for unit vectors u [..., 3]."""
  proj = u @ dirs.T  # [..., J]
  return np.cos(proj * freqs + phases) @ amps - offset


def _axis_coords(spec: PhantomSpec):
  d, h, w = spec.shape
  dz, dy, dx = spec.spacing_mm
  z = (np.arange(d) + 0.5 - d / 2.0) * dz
  y = (np.arange(h) + 0.5 - h / 2.0) * dy
  x = (np.arange(w) + 0.5 - w / 2.0) * dx
  return z, y, x


def _fov_half(spec: PhantomSpec) -> np.ndarray:
  return (
      0.5 * np.asarray(spec.shape, float) * np.asarray(spec.spacing_mm, float)
  )


def _breast_geometry(t: PatientTruth, z, y, x):
  """Normalised breast radius rho, anterior distance to the chest wall and depth below skin."""
  zc, _, xb = t.breast_center_mm
  az, ay, ax = t.breast_axes_mm
  ycw = (
      t.chest_wall_y_mm + t.chest_wall_curvature * (x - t.chest_wall_x_mm) ** 2
  )
  d_ant = ycw - y  # mm anterior of the chest wall (>0 in the breast)
  dz, dx = z - zc, x - xb
  rho = np.sqrt((dz / az) ** 2 + (d_ant / ay) ** 2 + (dx / ax) ** 2)
  dist = np.sqrt(dz**2 + d_ant**2 + dx**2)
  depth = dist * (
      1.0 / np.maximum(rho, 1e-6) - 1.0
  )  # exact along the ray from the centre
  return rho, d_ant, depth


# ----------------------------------------------------------------------------- simulation
def _log_volume_ratios(rng, pcr: int, r: float) -> np.ndarray:
  """Log tumour-volume ratio vs T0 per visit (-inf: no tumour) from the latent response."""
  e = rng.standard_normal(3)
  l1 = LOGVOL_T1[0] + LOGVOL_T1[1] * r + LOGVOL_T1[2] * e[0]
  l2 = LOGVOL_T2[0] + LOGVOL_T2[1] * r + LOGVOL_T2[2] * e[1]
  l3 = l2 + LOGVOL_T3[0] + LOGVOL_T3[1] * r + LOGVOL_T3[2] * e[2]
  return np.array([0.0, l1, l2, -np.inf if pcr else l3])


def _volumes(log_ratio: np.ndarray, v0: float, pcr: int) -> np.ndarray:
  """Volumes (mm^3) with the vanishing (pCR at T2) and residual-disease (non-pCR) floors."""
  vol = v0 * np.exp(log_ratio)
  floor = min(MIN_RESIDUAL_MM3, v0)
  if pcr:
    vol[1] = max(vol[1], floor)
    if vol[2] < VANISH_MM3:
      vol[2] = 0.0
  else:
    vol[1:] = np.maximum(vol[1:], floor)
  return vol


def _place_tumour(
    rng,
    t_partial: dict,
    spec: PhantomSpec,
    ext_r: float,
    ext_z: float,
    max_shift: np.ndarray,
):
  """Rejection-sample a tumour centre inside the breast and the slab; None if impossible."""
  half = _fov_half(spec)
  spacing = np.asarray(spec.spacing_mm, float)
  zc, _, xb = t_partial['breast_center_mm']
  az, ay, ax = t_partial['breast_axes_mm']
  lo = -half + max_shift + spacing
  hi = half - max_shift - spacing
  zlo, zhi = lo[0] + ext_z, hi[0] - ext_z
  if zlo > zhi:
    return None
  proxy = types.SimpleNamespace(**t_partial)
  for _ in range(400):
    cz = rng.uniform(zlo, zhi)
    cx = rng.uniform(max(lo[2] + ext_r, xb - ax), min(hi[2] - ext_r, xb + ax))
    ycw = (
        proxy.chest_wall_y_mm
        + proxy.chest_wall_curvature * (cx - proxy.chest_wall_x_mm) ** 2
    )
    cy = ycw - rng.uniform(0.0, ay)
    if not (lo[1] + ext_r <= cy <= hi[1] - ext_r):
      continue
    rho, d_ant, depth = _breast_geometry(
        proxy, np.float64(cz), np.float64(cy), np.float64(cx)
    )
    if (
        rho < 1
        and depth >= ext_r + proxy.subcutaneous_fat_mm * 0.5 + 2.0
        and (d_ant >= ext_r + proxy.retromammary_fat_mm * 0.5 + 2.0)
    ):
      return np.array([cz, cy, cx])
  return None


@functools.lru_cache(maxsize=None)
def _pcr_intercepts(slope: float) -> np.ndarray:
  """Per-subtype log-odds a with E[sigmoid(a + slope h)] = PCR_RATE over h ~ N(0, 1).

  Keeps every subtype's pCR rate (and so the subtype reference) unchanged by the knob.
  """
  nodes, weights = np.polynomial.hermite_e.hermegauss(64)
  weights = weights / weights.sum()
  return np.array(
      [
          optimize.brentq(
              lambda a: weights @ _sigmoid(a + slope * nodes) - rate,  # noqa: B023
              -30.0,
              30.0,
              xtol=1e-12,
          )
          for rate in PCR_RATE
      ]
  )


def _pcr_probability(spec: PhantomSpec, subtype: int, h: float) -> float:
  """P(pCR | subtype, h); PCR_RATE itself without the knob, so that cohort's draws are exact."""
  if not spec.transfer:
    return PCR_RATE[subtype]
  slope = spec.transfer * TRANSFER_PCR_LOGIT
  return float(_sigmoid(_pcr_intercepts(slope)[subtype] + slope * h))


def simulate_patient(spec: PhantomSpec, index: int) -> PatientTruth:
  """All random draws of one patient (cheap: no voxel arrays)."""
  # Children 1 and 2 are the renderer's; h has its own (4th) stream, so the knob consumes
  # none of the other draws.
  ss_scalar, _, _, ss_trait = np.random.SeedSequence(
      [int(spec.seed), int(index)]
  ).spawn(4)
  rng = np.random.default_rng(ss_scalar)
  half = _fov_half(spec)

  # --- biology
  h = (
      float(np.random.default_rng(ss_trait).standard_normal())
      if spec.transfer
      else 0.0
  )
  subtype = int(rng.choice(4, p=SUBTYPE_PREVALENCE))
  pcr = int(rng.random() < _pcr_probability(spec, subtype, h))
  a, b = RESPONSE_BETA['pcr' if pcr else 'non_pcr']
  r = float(rng.beta(a, b))
  her2 = subtype in (1, 2)
  arms = ARMS_HER2_POSITIVE if her2 else ARMS_HER2_NEGATIVE
  arm = arms[
      int(
          rng.choice(
              len(arms), p=[0.3] + [0.7 / (len(arms) - 1)] * (len(arms) - 1)
          )
      )
  ]
  visit_mask = rng.random(4) >= MISSING_RATE
  visit_mask[0] = True
  visit_days = np.round(VISIT_DAY_MEAN + VISIT_DAY_SD * rng.standard_normal(4))

  # --- tumour size and shape
  d_eq = float(
      np.clip(
          TUMOUR_DIAMETER_MEDIAN[subtype]
          * math.exp(0.3 * rng.standard_normal() - 0.1 * (r - 0.5)),
          10.0,
          40.0,
      )
  )
  ratios = np.exp(0.15 * rng.standard_normal(3))
  ratios /= np.prod(ratios) ** (1 / 3)
  q, rr = np.linalg.qr(rng.standard_normal((3, 3)))
  rot = q * np.sign(np.diag(rr))
  dirs = rng.standard_normal((_N_SHAPE, 3))
  dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
  freqs = rng.uniform(1.5, 3.5, _N_SHAPE)
  spic = rng.random() < 0.3
  freqs[-2:] = np.where(spic, rng.uniform(7.0, 10.0, 2), freqs[-2:])
  phases = rng.uniform(0, 2 * math.pi, _N_SHAPE)
  amps = rng.standard_normal(_N_SHAPE)
  lob = rng.uniform(0.12, 0.30)
  sphere = _fibonacci_sphere()
  raw = np.cos((sphere @ dirs.T) * freqs + phases)
  amps_low = amps.copy()
  amps_low[-2:] = 0.0
  f_low = raw @ amps_low
  amps = amps * lob / max(f_low.std(), 1e-6)
  if spic:
    f_hi = raw[:, -2:] @ amps[-2:]
    amps[-2:] *= 0.05 / max(f_hi.std(), 1e-6)
  else:
    amps[-2:] = 0.0
  f = raw @ amps
  offset = float(f.mean())
  rho_s = np.exp(f - offset)
  # Volume of the unit-scale body: (1/3) int rho^3 dOmega * prod(axes).
  unit_vol = 4 * math.pi / 3 * float(np.mean(rho_s**3))
  tex_dir = rng.standard_normal((_N_TEXTURE, 3))
  tex_dir /= np.linalg.norm(tex_dir, axis=1, keepdims=True)
  tex_k = tex_dir * (2 * math.pi / rng.uniform(6.0, 14.0, (_N_TEXTURE, 1)))
  tex_phase = rng.uniform(0, 2 * math.pi, _N_TEXTURE)
  tex_amp = float(
      np.clip(
          TEXTURE_AMPLITUDE * math.exp(spec.transfer * TRANSFER_TEXTURE * h),
          *TEXTURE_AMPLITUDE_RANGE,
      )
  )
  necrosis = 0.0
  if d_eq > 20.0 and rng.random() < NECROSIS_PROB[subtype]:
    necrosis = float(rng.uniform(0.25, 0.5))

  # --- kinetics and response
  logk0 = (
      math.log(TUMOUR_KTRANS_MEDIAN[subtype])
      + 0.15 * (r - 0.5)
      + 0.3 * rng.standard_normal()
  )
  k0 = float(np.clip(math.exp(logk0), 0.10, 0.40))
  ve = float(rng.uniform(*TUMOUR_VE_RANGE[subtype]))
  vp = float(rng.uniform(0.02, 0.08))
  traj_rng = np.random.default_rng(
      ss_scalar.spawn(1)[0]
  )  # keep trajectory draws separate
  log_ratio = _log_volume_ratios(traj_rng, pcr, r)
  logk_noise = traj_rng.standard_normal(4)

  # --- anatomy
  fov_y = 2 * half[1]
  t_post = float(np.clip(rng.uniform(0.18, 0.26) * fov_y, 15.0, 40.0))
  y0 = half[1] - t_post
  avail_y = y0 + half[1] - 4.0
  a_y = min(rng.uniform(45.0, 100.0), avail_y * rng.uniform(0.85, 1.0))
  a_x = min(rng.uniform(55.0, 90.0), half[2] * rng.uniform(0.9, 1.0) - 2.0)
  a_z = rng.uniform(60.0, 100.0)
  breast_center = np.array([rng.uniform(-10, 10), y0, rng.uniform(-5, 5)])
  anatomy = dict(
      breast_center_mm=breast_center,
      breast_axes_mm=np.array([a_z, a_y, a_x]),
      chest_wall_y_mm=float(y0),
      chest_wall_x_mm=float(breast_center[2] + rng.uniform(-25, 25)),
      chest_wall_curvature=float(rng.uniform(0.0, 0.003)),
      muscle_mm=float(rng.uniform(7.0, 14.0)),
      skin_mm=float(rng.uniform(1.0, 2.0)),
      subcutaneous_fat_mm=float(rng.uniform(3.0, 9.0)),
      retromammary_fat_mm=float(rng.uniform(3.0, 8.0)),
  )
  cat = int(rng.choice(4, p=DENSITY_PROB))
  fgt_density = float(rng.uniform(*DENSITY_RANGE[cat]))
  bpe = BPE_KTRANS[int(rng.choice(4, p=BPE_PROB))] * math.exp(
      0.2 * rng.standard_normal()
  )
  bpe_visits = bpe * BPE_VISIT_FACTOR * np.exp(0.1 * rng.standard_normal(4))
  muscle_k = float(rng.uniform(0.015, 0.03))
  t10_scale = float(np.exp(0.08 * rng.standard_normal()))
  fat_residual = float(rng.uniform(0.10, 0.22))
  gain = float(math.exp(rng.uniform(math.log(20000.0), math.log(45000.0))))
  snr_fat = float(rng.uniform(20.0, 40.0))
  fat_signal = (
      gain
      * M0_REL['fat']
      * fat_residual
      * float(spgr_signal(1.0, T10_S['fat'] * t10_scale))
  )
  noise_sigma = fat_signal / snr_fat
  delay = float(rng.uniform(2.0, 10.0))

  # --- acquisition per visit
  phase_times = np.zeros((4, 3), np.float32)
  phase_times[:, 1] = rng.uniform(120.0, 180.0, 4)
  phase_times[:, 2] = rng.uniform(400.0, 500.0, 4)
  dirs_shift = rng.standard_normal((4, 3))
  dirs_shift /= np.linalg.norm(dirs_shift, axis=1, keepdims=True)
  shift = dirs_shift * rng.uniform(1.0, 3.0, (4, 1))
  shift[0] = 0.0
  bias_coeffs = rng.standard_normal((4, _N_BIAS))
  bias_amp = rng.uniform(0.10, 0.20, 4)
  visit_gain = rng.uniform(0.9, 1.1, 4)

  # --- place the tumour (shrink it if it cannot fit the breast / slab)
  fitted = float(np.max(log_ratio))
  max_scale = float(np.exp(fitted / 3))
  max_shift = np.max(np.abs(shift), axis=0)
  partial = dict(anatomy)
  scale_d = 1.0
  center = None
  while center is None:
    base = (
        ratios
        * (d_eq * scale_d / 2.0)
        / (unit_vol / (4 * math.pi / 3)) ** (1 / 3)
    )
    pts = (
        sphere * rho_s[:, None] * base
    ) @ rot.T  # scanner-frame surface points at T0
    reach_r = float(np.max(np.linalg.norm(pts, axis=1)))
    reach_z = float(np.max(np.abs(pts[:, 0])))
    center = _place_tumour(
        rng, partial, spec, reach_r * max_scale, reach_z * max_scale, max_shift
    )
    if center is None:
      scale_d *= 0.9
      if scale_d < 0.1:
        raise ValueError(f'cannot fit a tumour into spec {spec}')
  v0 = float(np.prod(base) * unit_vol)
  # The knob's T2 term comes after the size is fitted, so that the T0 size does not reveal h:
  # a tumour it makes grow out of reach is moved, else its growth stops at the fitted bound.
  t2_shift = -spec.transfer * TRANSFER_LOGVOL_T2 * h
  if t2_shift:
    log_ratio[2:] += t2_shift
    grown = float(np.exp(np.max(log_ratio) / 3))
    if grown > max_scale:
      moved = _place_tumour(
          rng, partial, spec, reach_r * grown, reach_z * grown, max_shift
      )
      if moved is None:
        log_ratio[2:] = np.minimum(log_ratio[2:], fitted)
      else:
        center = moved

  volumes = _volumes(log_ratio, v0, pcr)
  tumour_scale = np.cbrt(volumes / v0)
  ktrans = np.zeros(4)
  for v in range(4):
    if volumes[v] > 0:
      ktrans[v] = max(
          k0 * math.exp(-LOGK_LAMBDA[v] * r + LOGK_SD[v] * logk_noise[v]),
          KTRANS_FLOOR,
      )

  # Missing visits: zero everything visit-specific.
  absent = ~visit_mask
  for arr in (volumes, ktrans, tumour_scale, bpe_visits, visit_days):
    arr[absent] = 0.0
  phase_times[absent] = 0.0
  shift[absent] = 0.0

  return PatientTruth(
      patient_id=patient_id(index),
      pcr=pcr,
      subtype=subtype,
      arm=arm,
      response=r,
      heterogeneity=h,
      visit_mask=visit_mask,
      tumor_volume_mm3=volumes,
      ktrans_per_min=ktrans,
      phase_times_s=phase_times,
      shift_mm=shift,
      visit_days=visit_days,
      tumor_ve=ve,
      tumor_vp=vp,
      tumor_center_mm=center,
      tumor_axes_mm=base,
      tumor_rotation=rot,
      tumor_scale=tumour_scale,
      shape_dirs=dirs,
      shape_freqs=freqs,
      shape_phases=phases,
      shape_amps=amps,
      shape_offset=offset,
      texture_k=tex_k,
      texture_phases=tex_phase,
      texture_amplitude=tex_amp,
      necrosis_fraction=necrosis,
      fgt_density=fgt_density,
      bpe_ktrans_per_min=bpe_visits,
      muscle_ktrans_per_min=muscle_k,
      t10_scale=t10_scale,
      fat_residual=fat_residual,
      gain=gain,
      snr_fat=snr_fat,
      noise_sigma=noise_sigma,
      bolus_delay_s=delay,
      bias_coeffs=bias_coeffs,
      bias_amplitude=bias_amp,
      visit_gain=visit_gain,
      **anatomy,
  )


# ----------------------------------------------------------------------------- rendering
def _sigmoid(x):
  return 0.5 * (1.0 + np.tanh(0.5 * x))


def _bias_field(spec: PhantomSpec, coeffs, amp, gain):
  d, h, w = spec.shape
  z = np.linspace(-1, 1, d)[:, None, None]
  y = np.linspace(-1, 1, h)[None, :, None]
  x = np.linspace(-1, 1, w)[None, None, :]
  terms = (
      z,
      y,
      x,
      z * z - 1 / 3,
      y * y - 1 / 3,
      x * x - 1 / 3,
      z * y,
      z * x,
      y * x,
  )
  p = sum(c * t for c, t in zip(coeffs, terms))
  p = np.broadcast_to(p, spec.shape)
  p = p / max(float(np.max(np.abs(p))), 1e-6)
  return (gain * np.exp(math.log1p(amp) * p)).astype(np.float32)


def _tumour_region(t: PatientTruth, v: int, z, y, x, spacing):
  """Bounding-box slices, normalised radius and texture of the tumour at visit v."""
  s = t.tumor_scale[v]
  if s <= 0:
    return None
  c = t.tumor_center_mm + t.shift_mm[v]
  rho_max = float(
      np.exp(
          np.max(
              _shape_field(
                  _fibonacci_sphere(),
                  t.shape_dirs,
                  t.shape_freqs,
                  t.shape_phases,
                  t.shape_amps,
                  t.shape_offset,
              )
          )
      )
  )
  ext = float(np.max(t.tumor_axes_mm)) * s * rho_max * 1.05
  sl = []
  for ax_coords, cc in zip((z, y, x), c):
    lo = int(np.searchsorted(ax_coords, cc - ext))
    hi = int(np.searchsorted(ax_coords, cc + ext))
    lo, hi = max(lo - 1, 0), min(hi + 1, len(ax_coords))
    sl.append(slice(lo, hi))
  zz, yy, xx = np.meshgrid(
      z[sl[0]] - c[0], y[sl[1]] - c[1], x[sl[2]] - c[2], indexing='ij'
  )
  p = np.stack([zz, yy, xx], axis=-1)
  local = (
      p @ t.tumor_rotation
  )  # scanner -> local (rotation^T applied to row vectors)
  qn = local / (t.tumor_axes_mm * s)
  nq = np.linalg.norm(qn, axis=-1)
  u = qn / np.maximum(nq, 1e-9)[..., None]
  f = _shape_field(
      u,
      t.shape_dirs,
      t.shape_freqs,
      t.shape_phases,
      t.shape_amps,
      t.shape_offset,
  )
  rho_t = nq / np.exp(f)
  inside = rho_t <= 1.0
  if not inside.any():  # tiny tumour at coarse sampling: keep its centre voxel
    idx = np.unravel_index(np.argmin(rho_t), rho_t.shape)
    inside[idx] = True
  # Texture attached to the tumour (moves and shrinks with it).
  tex = np.cos((local / s) @ t.texture_k.T + t.texture_phases) @ np.full(
      len(t.texture_phases), math.sqrt(2.0 / len(t.texture_phases))
  )
  return tuple(sl), inside, rho_t, tex


def _render(spec: PhantomSpec, index: int, with_maps: bool):
  t = simulate_patient(spec, index)
  _, ss_field, ss_noise = np.random.SeedSequence(
      [int(spec.seed), int(index)]
  ).spawn(3)
  frng = np.random.default_rng(ss_field)
  nrng = np.random.default_rng(ss_noise)
  shape = tuple(spec.shape)
  spacing = np.asarray(spec.spacing_mm, float)
  z, y, x = _axis_coords(spec)
  Z, Y, X = z[:, None, None], y[None, :, None], x[None, None, :]

  # FGT texture in the T0 (reference) frame, unit variance.
  field = ndimage.gaussian_filter(
      frng.standard_normal(shape).astype(np.float32),
      sigma=_FGT_SMOOTH_MM / spacing,
      mode='reflect',
  )
  field /= max(float(field.std()), 1e-6)
  bpe_noise = ndimage.gaussian_filter(
      frng.standard_normal(shape).astype(np.float32),
      sigma=3.0 / spacing,
      mode='reflect',
  )
  bpe_noise /= max(float(bpe_noise.std()), 1e-6)
  fgt_thr = None

  per_visit = (schema.NUM_VISITS,) + shape
  images = np.zeros((schema.NUM_VISITS, schema.NUM_PHASES) + shape, np.float16)
  masks = np.zeros(per_visit, np.uint8)
  maps = {}
  if with_maps:
    maps = dict(
        labels=np.zeros(per_visit, np.uint8),
        ktrans_per_min=np.zeros(per_visit, np.float32),
        ve=np.zeros(per_visit, np.float32),
        vp=np.zeros(per_visit, np.float32),
        t10_s=np.zeros(per_visit, np.float32),
        bias=np.zeros(per_visit, np.float32),
    )
  ts = t.t10_scale
  fat_pre = float(
      spgr_signal(M0_REL['fat'] * t.fat_residual, T10_S['fat'] * ts)
  )

  for v in range(schema.NUM_VISITS):
    if not t.visit_mask[v]:
      continue
    sh = t.shift_mm[v]
    zs, ys, xs = Z - sh[0], Y - sh[1], X - sh[2]
    rho, d_ant, depth = _breast_geometry(t, zs, ys, xs)
    breast = (rho <= 1.0) & (d_ant >= 0)
    skin = breast & (depth < t.skin_mm)
    muscle = (d_ant < 0) & (d_ant >= -t.muscle_mm)
    thorax = d_ant < -t.muscle_mm
    muscle, thorax = np.broadcast_to(muscle, shape), np.broadcast_to(
        thorax, shape
    )
    # FGT fraction (soft threshold) from the shifted texture.
    if v == 0 or not np.any(sh):
      fld, bn = field, bpe_noise
    else:
      fld = ndimage.shift(field, sh / spacing, order=1, mode='nearest')
      bn = ndimage.shift(bpe_noise, sh / spacing, order=1, mode='nearest')
    allowed = np.clip((depth - t.subcutaneous_fat_mm) / 3.0, 0, 1) * np.clip(
        (d_ant - t.retromammary_fat_mm) / 3.0, 0, 1
    )
    score = fld + 1.2 * (0.6 - rho)
    if (
        fgt_thr is None
    ):  # threshold fixed at T0 so the FGT is the same tissue at every visit
      inner = breast & (allowed > 0.5)
      frac = min(
          t.fgt_density / max(inner.sum() / max(breast.sum(), 1), 1e-3), 0.98
      )
      fgt_thr = (
          float(np.quantile(score[inner], 1.0 - frac)) if inner.any() else 10.0
      )
    f_fgt = np.where(
        breast & ~skin, _sigmoid((score - fgt_thr) / 0.15) * allowed, 0.0
    )

    # Per-voxel primary tissue parameters (+ fat partial-volume fraction).
    m0 = np.zeros(shape, np.float64)
    t10 = np.full(shape, T10_S['fgt'] * ts)
    kt = np.zeros(shape)
    ve = np.full(shape, 0.3)
    vp = np.zeros(shape)
    fat_frac = np.where(breast & ~skin, 1.0 - f_fgt, 0.0)
    bpe_k = t.bpe_ktrans_per_min[v] * np.exp(0.35 * bn)
    fgt_region = breast & ~skin
    m0[fgt_region] = M0_REL['fgt']
    kt[fgt_region] = bpe_k[fgt_region]
    vp[fgt_region] = 0.003
    m0[skin] = M0_REL['skin']
    t10[skin] = T10_S['skin'] * ts
    kt[skin] = 0.01
    vp[skin] = 0.01
    m0[muscle] = M0_REL['muscle']
    t10[muscle] = T10_S['muscle'] * ts
    kt[muscle] = t.muscle_ktrans_per_min
    ve[muscle] = 0.12
    vp[muscle] = 0.01
    m0[thorax] = M0_REL['thorax']
    t10[thorax] = T10_S['thorax'] * ts
    kt[thorax] = 0.01
    ve[thorax] = 0.2
    vp[thorax] = 0.01

    region = _tumour_region(t, v, z, y, x, spacing)
    tum_mask = np.zeros(shape, bool)
    necro = np.zeros(shape, bool)
    if region is not None:
      sl, inside, rho_t, tex = region
      core = inside & (rho_t < t.necrosis_fraction)
      w = (0.6 + 0.8 * np.minimum(rho_t, 1.0) ** 2) * np.exp(
          t.texture_amplitude * tex
      )
      w = np.where(core, 0.04 * w, w)
      w = w / float(w[inside].mean())
      sub_m0, sub_t10 = m0[sl], t10[sl]
      sub_kt, sub_ve, sub_vp, sub_ff = kt[sl], ve[sl], vp[sl], fat_frac[sl]
      sub_m0[inside] = np.where(core, M0_REL['necrosis'], M0_REL['tumour'])[
          inside
      ]
      sub_t10[inside] = (
          np.where(core, T10_S['necrosis'], T10_S['tumour']) * ts
      )[inside]
      sub_kt[inside] = np.minimum(t.ktrans_per_min[v] * w, 1.0)[inside]
      sub_ve[inside] = np.where(
          core, 0.6, np.clip(t.tumor_ve * (1 + 0.15 * tex), 0.1, 0.8)
      )[inside]
      sub_vp[inside] = np.where(core, 0.0, np.clip(t.tumor_vp * w, 0.0, 0.2))[
          inside
      ]
      sub_ff[inside] = 0.0
      tum_mask[sl] = inside
      necro[sl] = core
    masks[v] = tum_mask

    # Signal: pre, early, late.
    times = t.phase_times_s[v].astype(np.float64)
    conc = tofts_concentration(times[1:], kt, ve, vp, delay_s=t.bolus_delay_s)
    bias = _bias_field(
        spec, t.bias_coeffs[v], t.bias_amplitude[v], t.visit_gain[v]
    )
    for p in range(schema.NUM_PHASES):
      c = 0.0 if p == 0 else conc[p - 1]
      s = (1.0 - fat_frac) * spgr_signal(m0, t10, c) + fat_frac * fat_pre
      s = ndimage.gaussian_filter(
          s.astype(np.float32), _PSF_SIGMA_VOX, mode='constant'
      )
      s *= bias * t.gain
      n1 = nrng.standard_normal(shape, dtype=np.float32)
      n2 = nrng.standard_normal(shape, dtype=np.float32)
      s = np.sqrt((s + t.noise_sigma * n1) ** 2 + (t.noise_sigma * n2) ** 2)
      images[v, p] = s.astype(np.float16)

    if with_maps:
      lab = np.zeros(shape, np.uint8)
      lab[breast & (f_fgt < 0.5)] = LABELS['fat']
      lab[breast & (f_fgt >= 0.5)] = LABELS['fgt']
      lab[skin] = LABELS['skin']
      lab[muscle] = LABELS['muscle']
      lab[thorax] = LABELS['thorax']
      lab[tum_mask] = LABELS['tumour']
      lab[necro] = LABELS['necrosis']
      maps['labels'][v] = lab
      maps['ktrans_per_min'][v] = kt
      maps['ve'][v] = np.where(m0 > 0, ve, 0.0)
      maps['vp'][v] = vp
      maps['t10_s'][v] = np.where(m0 > 0, t10, 0.0)
      maps['bias'][v] = bias

  example = {
      'patient_id': t.patient_id,
      'images': images,
      'visit_mask': t.visit_mask.astype(bool),
      'tumor_mask': masks,
      'pcr': int(t.pcr),
      'subtype': int(t.subtype),
      'arm': t.arm,
      'spacing_mm': np.asarray(spec.spacing_mm, np.float32),
      'phase_times_s': t.phase_times_s.astype(np.float32),
  }
  return example, maps, t


def render_patient(spec: PhantomSpec, index: int) -> dict[str, object]:
  """The TFDS example of patient ``index`` (see the module docstring)."""
  return _render(spec, index, with_maps=False)[0]


def oracle_truth(t: PatientTruth) -> dict:
  """What the protocol's oracle reference reads of one patient (pcrjax.references), JSON-ready:
  subtype, true tumour volume and mean Ktrans at T0 and T1 (None at a missing T1), the
  heterogeneity h, and the T2 `log_volume_change` (None at a missing T2).

  Written with the dataset, never into a record: no model input may hold the truth.
  """
  early = [v for v in (0, 1) if t.visit_mask[v]]
  return {
      'subtype': int(t.subtype),
      'tumor_volume_mm3': [
          float(t.tumor_volume_mm3[v]) if v in early else None for v in (0, 1)
      ],
      'ktrans_per_min': [
          float(t.ktrans_per_min[v]) if v in early else None for v in (0, 1)
      ],
      'heterogeneity': float(t.heterogeneity),
      't2_log_volume_change': (
          log_volume_change(t, 2) if t.visit_mask[2] else None
      ),
  }


def render_example(
    spec: PhantomSpec, index: int
) -> tuple[dict[str, object], dict]:
  """(`render_patient`, `oracle_truth`) of patient ``index``: both from one simulation."""
  example, _, t = _render(spec, index, with_maps=False)
  return example, oracle_truth(t)


def render_patient_maps(spec: PhantomSpec, index: int):
  """``(example, maps, truth)`` for validating biomarkers and writers.

  ``maps`` holds per-visit ``labels`` (:data:`LABELS`), ``ktrans_per_min``, ``ve``, ``vp``,
  ``t10_s`` and ``bias`` arrays ``[4, D, H, W]`` in each visit's (shifted) frame.
  """
  return _render(spec, index, with_maps=True)


# ----------------------------------------------------------------------------- report
def _auroc(score: np.ndarray, label: np.ndarray) -> float:
  """Mann-Whitney AUROC (ties count 1/2)."""
  from scipy.stats import rankdata

  ranks = rankdata(score)
  pos = label.astype(bool)
  n1, n0 = int(pos.sum()), int((~pos).sum())
  return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _report(num: int = 200, spec: PhantomSpec | None = None) -> None:
  """Cohort summary: pCR rate and AUROC of mask-volume change at T1/T2, render time, and (with
  the transfer knob) what the heterogeneity h explains."""
  import time

  spec = spec or PhantomSpec()
  vox = float(np.prod(spec.spacing_mm))
  rows = []
  t0 = time.perf_counter()
  for i in range(num):
    ex = render_patient(spec, i)
    volumes = ex['tumor_mask'].reshape(schema.NUM_VISITS, -1).sum(1) * vox
    rows.append((ex['pcr'], ex['visit_mask'], volumes))
  dt = (time.perf_counter() - t0) / num
  y = np.array([r[0] for r in rows])
  vm = np.array([r[1] for r in rows])
  vol = np.array([r[2] for r in rows], float)
  print(
      f'{num} patients, spec {spec}: render {1000 * dt:.0f} ms/patient, pCR rate {y.mean():.3f}'
  )
  for v in (1, 2):
    ok = vm[:, v]
    change = vol[ok, v] / vol[ok, 0] - 1
    print(
        f'  T{v}: n={ok.sum()}, mean volume change pCR {change[y[ok] == 1].mean():+.2f} / '
        f'non-pCR {change[y[ok] == 0].mean():+.2f}, AUROC(-change) {_auroc(-change, y[ok]):.3f}'
    )
  if spec.transfer:
    truths = [simulate_patient(spec, i) for i in range(num)]
    h = np.array([t.heterogeneity for t in truths])
    amp = np.array([t.texture_amplitude for t in truths])
    t2 = np.array([log_volume_change(t, 2) for t in truths])
    ok = np.isfinite(t2)
    lo, hi = TEXTURE_AMPLITUDE_RANGE
    print(
        f'  h (transfer {spec.transfer:g}): R^2 of the T2 log-volume change '
        f'{np.corrcoef(h[ok], t2[ok])[0, 1] ** 2:.3f}, AUROC for pCR {_auroc(h, y):.3f}; '
        f'texture amplitude median {np.median(amp):.2f} ({amp.min():.2f}-{amp.max():.2f}), '
        f'{100 * np.mean((amp <= lo) | (amp >= hi)):.1f} % clipped'
    )


if __name__ == '__main__':
  import sys

  _report(
      int(sys.argv[1]) if len(sys.argv) > 1 else 200,
      PhantomSpec(transfer=float(sys.argv[2]) if len(sys.argv) > 2 else 0.0),
  )
