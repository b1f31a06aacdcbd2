"""Physics and biology tests of the synthetic I-SPY2 phantom (tfds_ispy2/ispy2/phantom.py)."""

import dataclasses
import hashlib
import json
import time

import numpy as np
import pytest
from scipy import integrate, stats

from tfds_ispy2.ispy2 import phantom as ph
from tfds_ispy2.ispy2 import schema

SPEC = ph.PhantomSpec(
    num_patients=64, shape=(12, 48, 48), spacing_mm=(3.0, 2.0, 2.0), seed=0
)
L = ph.LABELS
BREAST_LABELS = [L['fat'], L['fgt'], L['tumour'], L['necrosis'], L['skin']]
KEYS = {
    'patient_id',
    'images',
    'visit_mask',
    'tumor_mask',
    'pcr',
    'subtype',
    'arm',
    'spacing_mm',
    'phase_times_s',
}


@pytest.fixture(scope='module')
def cohort_truth():
  return [ph.simulate_patient(SPEC, i) for i in range(2000)]


@pytest.fixture(scope='module')
def rendered():
  """40 rendered patients with maps (shared by the slower tests)."""
  return [ph.render_patient_maps(SPEC, i) for i in range(40)]


def _pe(pre, post):
  return 100.0 * (post - pre) / np.maximum(pre, 1e-3)


# ----------------------------------------------------------------------------- API
def test_keys_shapes_dtypes():
  ex = ph.render_patient(SPEC, 3)
  assert set(ex) == KEYS
  d, h, w = SPEC.shape
  assert ex['patient_id'] == 'SYN-00003' and isinstance(ex['patient_id'], str)
  assert ex['images'].dtype == np.float16 and ex['images'].shape == (
      4,
      3,
      d,
      h,
      w,
  )
  assert ex['visit_mask'].dtype == np.bool_ and ex['visit_mask'].shape == (4,)
  assert ex['tumor_mask'].dtype == np.uint8 and ex['tumor_mask'].shape == (
      4,
      d,
      h,
      w,
  )
  assert set(np.unique(ex['tumor_mask'])) <= {0, 1}
  assert isinstance(ex['pcr'], int) and ex['pcr'] in (0, 1)
  assert isinstance(ex['subtype'], int) and 0 <= ex['subtype'] < 4
  assert (
      isinstance(ex['arm'], str)
      and ex['arm'] in ph.ARMS_HER2_NEGATIVE + ph.ARMS_HER2_POSITIVE
  )
  assert ex['spacing_mm'].dtype == np.float32
  np.testing.assert_array_equal(ex['spacing_mm'], np.float32(SPEC.spacing_mm))
  assert ex['phase_times_s'].dtype == np.float32 and ex[
      'phase_times_s'
  ].shape == (4, 3)
  assert schema.VISITS == ('T0', 'T1', 'T2', 'T3') and schema.PHASES == (
      'pre',
      'early',
      'late',
  )
  assert schema.SUBTYPES == ('HR+/HER2-', 'HR+/HER2+', 'HR-/HER2+', 'HR-/HER2-')


def test_phase_times():
  for i in range(20):
    t = ph.simulate_patient(SPEC, i)
    pt = t.phase_times_s[t.visit_mask]
    assert np.all(pt[:, 0] == 0)
    assert np.all((pt[:, 1] >= 120) & (pt[:, 1] <= 180))
    assert np.all((pt[:, 2] >= 400) & (pt[:, 2] <= 500))


def test_determinism_and_independence():
  a = ph.render_patient(SPEC, 5)
  b = ph.render_patient(SPEC, 5)
  c = ph.render_patient(
      ph.PhantomSpec(
          num_patients=3,
          shape=SPEC.shape,
          spacing_mm=SPEC.spacing_mm,
          seed=SPEC.seed,
      ),
      5,
  )
  for other in (b, c):
    for k in KEYS:
      np.testing.assert_array_equal(
          np.asarray(a[k]), np.asarray(other[k]), err_msg=k
      )
  d = ph.render_patient(ph.PhantomSpec(shape=SPEC.shape, seed=1), 5)
  assert not np.array_equal(a['images'], d['images'])
  e = ph.render_patient(SPEC, 6)
  assert not np.array_equal(a['images'], e['images'])
  # Generation order does not matter.
  ph.render_patient(SPEC, 9)
  np.testing.assert_array_equal(
      ph.render_patient(SPEC, 5)['images'], a['images']
  )
  # Truth agrees with the example.
  t = ph.simulate_patient(SPEC, 5)
  assert (t.pcr, t.subtype, t.arm, t.patient_id) == (
      a['pcr'],
      a['subtype'],
      a['arm'],
      a['patient_id'],
  )


def test_oracle_truth_is_the_simulations_and_json_ready():
  """What a build writes into the metadata for the oracle: the truth of the same simulation as the
  example (`render_example`), None at a missing T1 or T2, nothing numpy."""
  idx = next(
      i
      for i in range(500)
      if not ph.simulate_patient(SPEC, i).visit_mask[1:3].all()
  )
  for index in (5, idx):
    example, truth = ph.render_example(SPEC, index)
    t = ph.simulate_patient(SPEC, index)
    np.testing.assert_array_equal(
        example['images'], ph.render_patient(SPEC, index)['images']
    )
    assert (
        json.loads(json.dumps(truth)) == truth
        and truth['subtype'] == example['subtype']
    )
    for v in (0, 1):
      expected = float(t.tumor_volume_mm3[v]) if t.visit_mask[v] else None
      assert truth['tumor_volume_mm3'][v] == expected
    assert truth['t2_log_volume_change'] == (
        ph.log_volume_change(t, 2) if t.visit_mask[2] else None
    )
    assert truth['heterogeneity'] == t.heterogeneity
  missing = ph.oracle_truth(ph.simulate_patient(SPEC, idx))
  assert (
      missing['tumor_volume_mm3'][1] is None
      or missing['t2_log_volume_change'] is None
  )


def test_patient_id_carries_only_the_index():
  assert ph.patient_id(42) == 'SYN-00042'
  assert (
      ph.simulate_patient(SPEC, 42).patient_id
      == ph.simulate_patient(ph.PhantomSpec(seed=7), 42).patient_id
      == 'SYN-00042'
  )


# ----------------------------------------------------------------------------- cohort
def test_cohort_rates(cohort_truth):
  n = len(cohort_truth)
  pcr = np.array([t.pcr for t in cohort_truth])
  st = np.array([t.subtype for t in cohort_truth])
  vm = np.array([t.visit_mask for t in cohort_truth])
  assert abs(pcr.mean() - 0.32) < 0.04
  np.testing.assert_allclose(
      np.bincount(st, minlength=4) / n, [0.40, 0.15, 0.10, 0.35], atol=0.035
  )
  for k, rate in enumerate([0.18, 0.35, 0.65, 0.40]):
    assert abs(pcr[st == k].mean() - rate) < 0.08, (k, pcr[st == k].mean())
  assert vm[:, 0].all()
  np.testing.assert_allclose(
      1 - vm[:, 1:].mean(0), [0.05, 0.08, 0.10], atol=0.025
  )
  for t in cohort_truth:
    if t.arm in ph.ARMS_HER2_POSITIVE:
      assert t.subtype in (1, 2)
    else:
      assert t.subtype in (0, 3)
  assert 0.0 <= min(t.response for t in cohort_truth)
  assert max(t.response for t in cohort_truth) <= 1.0


def test_cohort_response_biology(cohort_truth):
  """T1 change small and partly informative, T2 clearly informative; pCR -> no tumour at T3."""
  pcr = np.array([t.pcr for t in cohort_truth])
  vm = np.array([t.visit_mask for t in cohort_truth])
  vol = np.array([t.tumor_volume_mm3 for t in cohort_truth])
  assert np.all(vol[:, 0] > 0)
  d0 = np.cbrt(vol[:, 0] * 6 / np.pi)
  assert d0.min() >= 6 and d0.max() <= 42 and 18 < np.median(d0) < 30

  def auroc(score, y):  # Mann-Whitney
    pos, neg = score[y == 1], score[y == 0]
    return np.mean(pos[:, None] > neg[None, :]) + 0.5 * np.mean(
        pos[:, None] == neg[None, :]
    )

  ch = {}
  for v in (1, 2):
    ok = vm[:, v]
    ch[v] = vol[ok, v] / vol[ok, 0] - 1
    ch[v, 'auc'] = auroc(-ch[v], pcr[ok])
  assert abs(ch[1].mean()) <= 0.15
  assert abs(ch[1].mean()) < abs(ch[2].mean())
  assert 0.6 <= ch[1, 'auc'] <= 0.8, ch[1, 'auc']
  assert 0.82 <= ch[2, 'auc'] <= 0.93, ch[2, 'auc']
  ok = vm[:, 3]
  assert np.all(vol[ok & (pcr == 1), 3] == 0)
  assert np.all(vol[ok & (pcr == 0), 3] > 0)
  # Missing visits carry zeros in the truth.
  assert np.all(vol[~vm] == 0)
  k = np.array([t.ktrans_per_min for t in cohort_truth])
  assert np.all((k[:, 0] >= 0.1) & (k[:, 0] <= 0.4))
  # Ktrans falls more in responders by T2.
  ok = vm[:, 2] & (vol[:, 2] > 0)
  kr = k[ok, 2] / k[ok, 0]
  assert kr[pcr[ok] == 1].mean() < kr[pcr[ok] == 0].mean() - 0.1


# ----------------------------------------------------------------------------- kinetics
def test_parker_aif_and_tofts():
  t = np.linspace(-1, 10, 2000)
  cp = ph.parker_aif_plasma(t)
  assert np.all(cp[t < 0] == 0)
  peak_t = t[np.argmax(cp)]
  assert 0.12 < peak_t < 0.22  # ~10 s
  assert 9.0 < cp.max() < 13.0  # blood peak ~6 mM / (1 - 0.45)
  # Tabulated/interpolated Tofts vs brute-force convolution.
  for kt, ve, vp, delay in [
      (0.25, 0.35, 0.05, 5.0),
      (0.1, 0.5, 0.02, 2.0),
      (0.01, 0.3, 0.0, 9.0),
      (0.8, 0.2, 0.08, 3.0),
  ]:
    times = np.array([150.0, 450.0])
    got = ph.tofts_concentration(times, kt, ve, vp, delay_s=delay)
    for i, ts in enumerate(times):
      tm = (ts - delay) / 60
      u = np.linspace(0, tm, 20001)
      ref = vp * ph.parker_aif_plasma(tm) + kt * np.trapezoid(
          ph.parker_aif_plasma(u) * np.exp(-kt / ve * (tm - u)), u
      )
      np.testing.assert_allclose(got[i], ref, rtol=5e-3)
  # C cannot exceed the extravascular+plasma capacity by much at late times.
  assert ph.tofts_concentration([450.0], 0.3, 0.3, 0.05)[0] < 1.0
  # SPGR: monotone in concentration; pre-contrast contrast fat > tumour > FGT (no fat sat).
  s = ph.spgr_signal(1.0, 1.0, np.array([0.0, 0.1, 0.5, 2.0]))
  assert np.all(np.diff(s) > 0) and s[-1] < np.sin(np.radians(30))
  assert (
      ph.spgr_signal(1, 0.38) > ph.spgr_signal(1, 1.0) > ph.spgr_signal(1, 1.2)
  )


def test_enhancement_pattern(rendered):
  """Tumour PE >> FGT (BPE) > fat ~ 0; the I-SPY FTV-like PE>=70% region is the tumour."""
  overlaps, dices, tum_pe, fgt_pe, fat_pe, fgt_hot, ser, bg_pass = (
      [],
      [],
      [],
      [],
      [],
      [],
      [],
      [],
  )
  for ex, maps, _ in rendered[:12]:
    pre, early, late = ex['images'][0].astype(np.float32)
    lab = maps['labels'][0]
    tm = ex['tumor_mask'][0].astype(bool)
    pe = _pe(pre, early)
    breast = np.isin(lab, BREAST_LABELS)
    fgt, fat, enh = lab == L['fgt'], lab == L['fat'], lab == L['tumour']
    tum_pe.append(pe[tm].mean())
    fgt_pe.append(pe[fgt].mean())
    fat_pe.append(pe[fat].mean())
    fgt_hot.append(np.mean(pe[fgt] >= 70))
    ser.append((early - pre)[enh].mean() / (late - pre)[enh].mean())
    # I-SPY background threshold: S0 >= 0.6 x 95th percentile of S0 (in the breast).
    bg = pre >= 0.6 * np.percentile(pre[breast], 95)
    bg_pass.append(bg[tm].mean())
    hot = breast & bg & (pe >= 70)
    overlaps.append((hot & tm).sum() / max(hot.sum(), 1))
    dices.append(2 * (hot & tm).sum() / (hot.sum() + tm.sum()))
  tum_pe, fgt_pe, fat_pe = map(np.array, (tum_pe, fgt_pe, fat_pe))
  assert np.all(tum_pe > 100), tum_pe
  assert np.all(tum_pe > 3 * fgt_pe), (tum_pe, fgt_pe)
  assert np.all(fgt_pe < 60) and np.all(fgt_pe > 2), fgt_pe
  assert np.all(np.abs(fat_pe) < 10), fat_pe
  assert np.mean(fgt_hot) < 0.05
  assert np.median(overlaps) > 0.7 and min(overlaps) > 0.5, overlaps
  assert np.median(dices) > 0.7 and min(dices) > 0.5, dices
  assert (
      np.min(bg_pass) > 0.9
  ), bg_pass  # fat-suppressed: tumour passes the background threshold
  assert (
      np.median(ser) > 1.1
  )  # washout (type III) is the commonest malignant curve


def test_fgt_enhancement_is_progressive_and_rim_exceeds_core(rendered):
  late_gt_early, rim_gt_core = [], []
  for ex, maps, t in rendered[:12]:
    pre, early, late = ex['images'][0].astype(np.float32)
    lab = maps['labels'][0]
    fgt = lab == L['fgt']
    late_gt_early.append((late - pre)[fgt].mean() > (early - pre)[fgt].mean())
    kt = maps['ktrans_per_min'][0]
    tm = ex['tumor_mask'][0].astype(bool)
    # Rim (tumour voxels touching the outside) vs the rest.
    from scipy import ndimage

    rim = tm & ~ndimage.binary_erosion(tm)
    core = tm & ~rim
    if core.sum() > 10:
      rim_gt_core.append(kt[rim].mean() > kt[core].mean())
    np.testing.assert_allclose(kt[tm].mean(), t.ktrans_per_min[0], rtol=1e-4)
  assert np.mean(late_gt_early) > 0.8
  assert np.mean(rim_gt_core) > 0.8


# ----------------------------------------------------------------------------- response
def test_response_in_masks(rendered):
  vox = float(np.prod(SPEC.spacing_mm))
  rows = []
  for ex, _, t in rendered:
    v = ex['tumor_mask'].reshape(4, -1).sum(1) * vox
    vm = ex['visit_mask']
    # The mask volume is the rendered truth volume.
    present = vm & (t.tumor_volume_mm3 > 0)
    np.testing.assert_allclose(
        v[present], t.tumor_volume_mm3[present], rtol=0.3, atol=3 * vox
    )
    if vm[3]:
      if ex['pcr']:
        assert v[3] == 0, 'pCR must leave no tumour at T3'
      else:
        assert v[3] > 0, 'non-pCR keeps residual disease at T3'
    rows.append((ex['pcr'], vm[1], vm[2], v[1] / v[0] - 1, v[2] / v[0] - 1))
  rows = np.array(rows, dtype=float)
  y = rows[:, 0]
  assert 5 <= y.sum() <= 30
  t2 = rows[rows[:, 2] == 1]
  resp, non = t2[t2[:, 0] == 1, 4], t2[t2[:, 0] == 0, 4]
  assert resp.mean() < non.mean() - 0.2, (resp.mean(), non.mean())
  t1 = rows[rows[:, 1] == 1, 3]
  assert abs(t1.mean()) < abs(t2[:, 4].mean())
  assert abs(t1.mean()) < 0.2


def test_missing_visit_is_all_zero():
  idx = next(
      i for i in range(500) if not ph.simulate_patient(SPEC, i).visit_mask.all()
  )
  ex = ph.render_patient(SPEC, idx)
  miss = ~ex['visit_mask']
  assert miss.any() and ex['visit_mask'][0]
  assert np.all(ex['images'][miss] == 0)
  assert np.all(ex['tumor_mask'][miss] == 0)
  assert np.all(ex['phase_times_s'][miss] == 0)
  assert np.all(ex['images'][~miss].reshape(int((~miss).sum()), -1).max(1) > 0)


def test_misregistration_moves_the_mask(rendered):
  for ex, _, t in rendered[:10]:
    m = ex['tumor_mask']
    if not ex['visit_mask'][1] or m[1].sum() < 20:
      continue
    c0 = np.array(np.nonzero(m[0])).mean(1) * SPEC.spacing_mm
    c1 = np.array(np.nonzero(m[1])).mean(1) * SPEC.spacing_mm
    assert 0.9 <= np.linalg.norm(t.shift_mm[1]) <= 3.1
    np.testing.assert_allclose(c1 - c0, t.shift_mm[1], atol=1.5)
  for _, _, t in rendered:
    assert np.all(t.shift_mm[0] == 0)


# ----------------------------------------------------------------------------- acquisition
def test_rician_noise_and_range(rendered):
  for ex, maps, t in rendered[:8]:
    im = ex['images'].astype(np.float32)
    assert np.all(np.isfinite(im)) and im.min() >= 0
    assert im.max() < 30000  # float16 max is 65504
    present = ex['visit_mask']
    air = maps['labels'][0] == L['air']
    # Only air far from tissue (the PSF spreads signal by ~1 voxel).
    from scipy import ndimage

    far = ndimage.binary_erosion(air, iterations=3)
    a = im[0, 0][far]
    assert a.mean() > 0
    # Zero-signal Rician = Rayleigh: mean sigma sqrt(pi/2), var (2 - pi/2) sigma^2.
    np.testing.assert_allclose(
        a.mean(), t.noise_sigma * np.sqrt(np.pi / 2), rtol=0.1
    )
    np.testing.assert_allclose(
        a.var(), (2 - np.pi / 2) * t.noise_sigma**2, rtol=0.25
    )
    # Fat SNR ~ 20-40 (suppressed fat), MR-like values.
    fat = maps['labels'][0] == L['fat']
    snr = im[0, 0][fat].mean() / t.noise_sigma
    assert 12 < snr < 60, snr
    fgt = maps['labels'][0] == L['fgt']
    assert 100 < im[0, 0][fgt].mean() < 2000
    # Bias field: the same for the 3 phases, different between visits, +-10-20 %.
    b = maps['bias'][present]
    rel = b / b.reshape(len(b), -1).mean(1)[:, None, None, None]
    assert 0.05 < (rel.max() - rel.min()) / 2 < 0.3
    if present.sum() > 1:
      assert not np.allclose(b[0], b[1])


def test_render_time_default_spec():
  spec = ph.PhantomSpec()
  ph.render_patient(spec, 0)
  t0 = time.perf_counter()
  for i in range(1, 4):
    ex = ph.render_patient(spec, i)
  dt = (time.perf_counter() - t0) / 3
  assert ex['images'].shape == (4, 3, 16, 64, 64)
  assert dt < 0.5, dt


# ----------------------------------------------------------------------------- transfer knob
SYNTHETIC = ph.PhantomSpec(
    num_patients=512, shape=(16, 64, 64), spacing_mm=(3.0, 2.0, 2.0), seed=0
)
SMOKE = ph.PhantomSpec(
    num_patients=48, shape=(8, 32, 32), spacing_mm=(6.0, 4.0, 4.0)
)
TRANSFER = dataclasses.replace(SYNTHETIC, transfer=1.0)
# sha256 of render_patient's images then tumor_mask bytes, and pCR: the `synthetic` and
# `synthetic_smoke` cohorts pinned, so that the knob at 0 (or any refactor) cannot move a byte.
PINNED_RENDERS = {
    (SYNTHETIC, 0): (
        1,
        'f1fcb22b5e066314b20ec54d3bb2dad69264ab8fa276c6023f4df5bddf916615',
    ),
    (SYNTHETIC, 5): (
        0,
        '0cb9dfd46e0f3bd827cf0826493d754263a0e84ea0fdf0395dc2f40a74af4187',
    ),
    (SYNTHETIC, 9): (
        0,
        '1a1da5e81fbbe937bc6bd98541bf2e72fb17151f9cde38aa8acd00b8f394be2c',
    ),
    (SMOKE, 0): (
        1,
        '9ce17377360f2f02a65d8ec580414ac65a82d787832d33452658b5a3cc86fb43',
    ),
    (SMOKE, 3): (
        1,
        '3df5f869fd483056eeafd51103b61af3673de5044fe533ed6e9784853b15fcea',
    ),
    (SMOKE, 10): (
        0,
        '2c640e278fca3e940699f1e1e129c07d57b77f42baf057ec6a9d51b1b52262da',
    ),
}
# The same for every patient's truth (labels, visits, volumes and Ktrans, rounded).
PINNED_TRUTHS = {
    (
        SYNTHETIC,
        200,
    ): '791807f97d0bc5691ef5cc1dbc73ae480d389fc18930f4c51c5532b07714d37a',
    (
        SMOKE,
        48,
    ): 'a35ed907a643bff53e980b4ba2e08fed9d29e3381bf2b4201ad04a4a3437a8d6',
}


@pytest.fixture(scope='module')
def transfer_pairs():
  """(knob off, knob on) truths of the same 1000 patients of the `synthetic_transfer` spec."""
  return [
      (ph.simulate_patient(SYNTHETIC, i), ph.simulate_patient(TRANSFER, i))
      for i in range(1000)
  ]


def _auroc(score, y):
  pos, neg = score[y == 1], score[y == 0]
  return np.mean(pos[:, None] > neg[None, :]) + 0.5 * np.mean(
      pos[:, None] == neg[None, :]
  )


def test_default_cohorts_are_byte_identical_to_the_pinned_ones():
  for (spec, index), (pcr, digest) in PINNED_RENDERS.items():
    ex = ph.render_patient(spec, index)
    got = hashlib.sha256(ex['images'].tobytes())
    got.update(ex['tumor_mask'].tobytes())
    assert (ex['pcr'], got.hexdigest()) == (pcr, digest), (spec, index)
  for (spec, num), digest in PINNED_TRUTHS.items():
    got = hashlib.sha256()
    for i in range(num):
      t = ph.simulate_patient(spec, i)
      got.update(np.array([t.pcr, t.subtype], np.int64).tobytes())
      got.update(t.visit_mask.tobytes())
      got.update(np.round(t.tumor_volume_mm3, 3).tobytes())
      got.update(np.round(t.ktrans_per_min, 6).tobytes())
    assert got.hexdigest() == digest, spec


def test_transfer_off_carries_no_heterogeneity(transfer_pairs):
  for off, on in transfer_pairs[:50]:
    assert (
        off.heterogeneity == 0.0
        and off.texture_amplitude == ph.TEXTURE_AMPLITUDE
    )
    assert on.heterogeneity != 0.0
  with pytest.raises(ValueError, match='transfer'):
    ph.PhantomSpec(transfer=1.5)


def test_transfer_draws_h_from_its_own_stream(transfer_pairs):
  """h is one patient trait at any knob setting; the knob consumes none of the other draws."""
  half = dataclasses.replace(SYNTHETIC, transfer=0.5)
  for i, (_, on) in enumerate(transfer_pairs[:20]):
    assert ph.simulate_patient(half, i).heterogeneity == on.heterogeneity
  same = [(off, on) for off, on in transfer_pairs if off.pcr == on.pcr]
  assert len(same) > 0.8 * len(transfer_pairs)
  for off, on in same:
    for field in ('subtype', 'arm', 'response', 'gain', 'bolus_delay_s'):
      assert getattr(off, field) == getattr(on, field), field
    np.testing.assert_array_equal(off.visit_mask, on.visit_mask)
    np.testing.assert_array_equal(off.texture_k, on.texture_k)
    # T0 and T1 do not move: the T0 size is fitted to the field of view before the knob's term.
    np.testing.assert_array_equal(
        off.tumor_volume_mm3[:2], on.tumor_volume_mm3[:2]
    )
    np.testing.assert_array_equal(off.ktrans_per_min[:2], on.ktrans_per_min[:2])
  # Where no floor or field-of-view bound intervenes, T2 moves by exactly the knob's term.
  shifted = [
      ph.log_volume_change(on, 2)
      - ph.log_volume_change(off, 2)
      + ph.TRANSFER_LOGVOL_T2 * on.heterogeneity
      for off, on in same
      if on.visit_mask[2]
      and not on.pcr
      and min(off.tumor_volume_mm3[2], on.tumor_volume_mm3[2])
      > 2 * ph.MIN_RESIDUAL_MM3
  ]
  assert np.mean(np.isclose(shifted, 0.0)) > 0.85


def test_transfer_knob_biology(transfer_pairs):
  """h sets much of the T2 change, informs pCR moderately, and hides from T0/T1 means."""
  truths = [on for _, on in transfer_pairs]
  h = np.array([t.heterogeneity for t in truths])
  pcr = np.array([t.pcr for t in truths])
  subtype = np.array([t.subtype for t in truths])
  vm = np.array([t.visit_mask for t in truths])
  vol = np.array([t.tumor_volume_mm3 for t in truths])
  k = np.array([t.ktrans_per_min for t in truths])
  assert abs(h.mean()) < 0.1 and 0.9 < h.std() < 1.1
  assert abs(pcr.mean() - 0.32) < 0.04
  for s, rate in enumerate(ph.PCR_RATE):
    assert abs(pcr[subtype == s].mean() - rate) < 0.08, s
  assert 0.64 <= _auroc(h, pcr) <= 0.74
  t2 = np.array([ph.log_volume_change(t, 2) for t in truths])
  ok = vm[:, 2]
  assert np.corrcoef(h[ok], t2[ok])[0, 1] ** 2 >= 0.3
  # Within a pCR group, nothing tumour-mean at T0/T1 follows h.
  for label in (0, 1):
    rows = (pcr == label) & vm[:, 1]
    v, kt = np.log(vol[rows, :2]), np.log(k[rows, :2])
    for name, q in (
        ('log V0', v[:, 0]),
        ('log K0', kt[:, 0]),
        ('T1 volume change', v[:, 1] - v[:, 0]),
        ('T1 Ktrans change', kt[:, 1] - kt[:, 0]),
    ):
      assert abs(np.corrcoef(h[rows], q)[0, 1]) < 0.12, (label, name)
  amp = np.array([t.texture_amplitude for t in truths])
  lo, hi = ph.TEXTURE_AMPLITUDE_RANGE
  np.testing.assert_allclose(
      amp,
      np.clip(ph.TEXTURE_AMPLITUDE * np.exp(ph.TRANSFER_TEXTURE * h), lo, hi),
  )
  assert np.mean((amp <= lo) | (amp >= hi)) < 0.05


def test_pcr_intercepts_keep_every_subtype_rate():
  slope = ph.TRANSFER_PCR_LOGIT
  for a, rate in zip(ph._pcr_intercepts(slope), ph.PCR_RATE):
    mean, _ = integrate.quad(
        lambda x: stats.norm.pdf(x) / (1 + np.exp(-a - slope * x)),  # noqa: B023
        -12,
        12,
    )
    assert abs(mean - rate) < 1e-9


def test_heterogeneity_is_visible_as_enhancement_texture():
  """Patchier Ktrans and enhancement with h at T0, the tumour-mean Ktrans unchanged."""
  spec = dataclasses.replace(SPEC, transfer=1.0)
  rows = []
  for i in range(16):
    ex, maps, t = ph.render_patient_maps(spec, i)
    tm = ex['tumor_mask'][0].astype(bool)
    kt = maps['ktrans_per_min'][0][tm]
    np.testing.assert_allclose(kt.mean(), t.ktrans_per_min[0], rtol=0.02)
    pre, early, _ = ex['images'][0].astype(np.float32)
    pe = (early - pre)[tm] / pre[tm]
    rows.append((t.heterogeneity, np.std(np.log(kt)), pe.std() / pe.mean()))
  h, log_k_spread, pe_cv = np.array(rows).T
  assert stats.spearmanr(h, log_k_spread)[0] > 0.4
  assert stats.spearmanr(h, pe_cv)[0] > 0.4
