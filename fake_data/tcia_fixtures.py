"""TCIA-like I-SPY2 DICOM download trees rendered from the phantom, for tests of `ispy2/tcia`.

The `tcia` config of the `ispy2` TFDS dataset reads a user's I-SPY2 download from TCIA
(the package `tfds_ispy2/ispy2/tcia/`; this module and the reader follow the same shared
contract).
Nobody can ship real patients in a test suite, so this module writes a *fake download* of the
same shape: ``<root>/ISPY2/<PatientID>/<study folder>/<series folder>/1-NNN.dcm`` plus the
clinical xlsx sheets, for the reader's unit tests and for the TFDS ``dummy_data/``.  Every pixel
comes from the phantom's own physics (`tfds_ispy2/ispy2/phantom.py`):
:func:`phantom.render_patient_maps` gives per-visit tissue labels, Ktrans / ve / vp / T10 and
coil-bias maps; this module evaluates :func:`phantom.tofts_concentration` +
:func:`phantom.spgr_signal` at *every* phase time of a 5-9-phase DCE series (so all phases are
physically consistent, and the phases nearest 0 / 150 / 450 s are the phantom's pre / early /
late physics), applies the phantom's PSF, bias field and gain, and adds Rician noise with the
phantom's sigma.  Fat is the phantom's fat-suppressed
residual signal (voxels labelled fat are pure fat: partial volume is dropped).

Geometry is written *truthfully*: the phantom volume of a visit is placed in DICOM LPS patient
space by a per-patient orientation (axial, oblique, flipped or sagittal) and a per-visit table
position, and ImagePositionPatient / ImageOrientationPatient / PixelSpacing say exactly where
every voxel is.  A reader that respects DICOM geometry recovers the phantom; the ground truth
returned by :func:`write_tcia_tree` (tumour and FTV centroids in mm LPS, volumes in mm^3, phase
choice, visit mask, skip reason, mask source, crop centre) is physical, not voxel-based.  A visit
with a different voxel grid is resampled from the phantom maps (scipy ``map_coordinates``, in
physical coordinates, labels nearest-neighbour) before the physics runs, so its tumour is the
same physical object.

Each visit's Analysis Mask is what UCSF's VOLSER makes of the images *as written*: inside a VOI
drawn around the tumour (its box grown by 1 slice and 3 voxels in plane), :func:`volser_codes`
flags per voxel the background threshold (16), PE < 70 % (1) and the SER / minimum-neighbour
filter (2), and bit 32 outside the VOI; 0 is the functional tumour volume (FTV), which therefore
follows the enhancement (the necrotic core and the PSF rim that fails the background threshold
are out; ``truth.ftv_*``), not the phantom's tumour mask (``truth.tumor_*``).  The flags are
written in one of two forms (``Case.mask``):

* the collection's own, by default: SEG SOP class but not a valid SEG, 8-bit frames holding the
  flags (one frame per plane, declared FRACTIONAL, no SegmentSequence), the private Mask Legend
  (0117,10D3) (or none, ``bitflags_no_legend``), ``DerivationDescription``
  ``VOLSER,BACKGROUND=<S0 threshold>,SER PE THRESHOLD=70``, plane orientation shared or per frame
  (``bitflags_per_frame``); :func:`set_bitflag_mask` writes it for any geometry;
* the standard one (``seg``): a BINARY SEG with one segment per exclusion bit (``PE threshold``,
  ``SER/min neighbour``, ``background threshold``, ``manual VOI``; they overlap), or one segment
  ``excluded`` and so no VOI (``seg_excluded``); in the layout highdicom writes (shared plane
  orientation / pixel measures, per-frame plane position, segment identification, frame content
  and derivation image; dimension index = (segment, plane); empty frames omitted, so frames are
  not planes x segments; frames bit-packed by ``pydicom.pixels.pack_bits``); highdicom's own
  reader gets the same FTV back (tested).  highdicom's ``Segmentation`` constructor is not used
  (slow for a tree's many masks, and these masks have planes beyond their source series).

Every mask covers *more* slices than its DCE series, asymmetrically (1 plane below, 3 above,
outside the VOI), so a reader that centre-crops instead of resampling by geometry is off by one
slice.

Every DICOM file is written by ``pydicom.dcmwrite(..., enforce_file_format=True)`` (explicit VR
little endian, file meta included): one dataset per MR series holds the shared elements and the
per-slice ones are set on it before each write; faulty files are cut after pydicom wrote them.

Headers carry PHI-like values (PatientName ``Doe^Jane``, birth date, study/series/content dates,
InstitutionName, AccessionNumber, ReferringPhysicianName, OperatorsName, PatientAge, ...) and the
clinical sheet carries Age / Race / Ethnicity / Menopausal status; :data:`PHI_STRINGS` and each
patient's ``truth.phi`` list them so tests can assert that none reaches the reader's output.
Output is a pure function of ``(cases, seed, spec)``: UIDs are ``generate_uid`` of the pydicom
root with entropy from the seed, and noise comes from ``SeedSequence([seed, crc32(id), ...])``, so
the DICOM files are byte-for-byte deterministic; the xlsx sheets are plain ``openpyxl`` saves,
deterministic in content (openpyxl stamps the save time into the file).  A patient's files depend
only on its own case, the seed and the spec, not on the other cases.

Cases (:data:`DEFAULT_CASES`; ``name``: what it is -> what the reader must do):

* ``standard``: axial, 7 phases, 4 visits, SER + PE2 derived series, an identical duplicate
  sheet row -> read all 4 visits, ignore SER/PE2, keep the patient (identical rows agree).
* ``oblique``: IOP rotated 17 deg about (1, 1, 0)/sqrt 2, 6 phases, RescaleSlope 2, pCR (T3
  mask with an empty FTV), bit-flag masks with the orientation per frame -> resample by
  geometry; the T3 crop centres on the T3 VOI.
* ``flipped``: a right breast whose rows run right-to-left (IOP row = -x) so the normal is -z;
  files written in reverse order; 8 phases; bit-flag masks without a Mask Legend -> sort along
  the normal; nothing mirrored; the documented bits.
* ``sagittal``: IOP [0, 1, 0, 0, 0, -1], slices stacked along x -> resample by geometry.
* ``spacing``: T1 on a 3x2x2 mm grid, T2 on 4x2.4x2.0 mm (anisotropic in plane), T3 on
  4.5x2.5x2.5 mm, T0 on the phantom grid; standard BINARY SEGs -> resample each visit by its
  own geometry; read the standard form.
* ``node``: an enhancing lymph node (13 mm radius) 50 mm from the tumour, outside the VOI and
  larger than the tumour; T1 without a mask -> crop on the FTV (T0, T2) and on PE >= 70 % inside
  T0's VOI carried over (T1, ``pe70_in_voi``), never on the node, which PE >= 70 % over the field
  of view would take.
* ``bilateral``: only ``bi-lateral: original DCE`` series (twice the columns: the mirrored
  contralateral breast, without tumour, next to the imaged one) and ``bi-lateral: Analysis
  Mask``; pCR (empty T3 mask); no T2 study -> use the bi-lateral series and mask.
* ``uni_and_bi``: T0 has both a bi-lateral and a uni-lateral DCE and both masks (bi written
  first, lower series numbers); 9 phases; ``seg_excluded`` SEGs -> prefer uni-lateral
  and the matching uni-lateral mask (both masks give the same FTV by geometry, so only the
  chosen DCE, not the mask choice, is visible in the output).
* ``acrin``: TCIA id ``ACRIN-6698-...``, ``ACRIN-6698:`` series prefix, ``...6698ISPY2MRIT0``
  study descriptions, 5 phases, RescaleIntercept -50; sheet uses the research id, the ancillary
  xlsx maps it -> map the id through the ancillary sheet.
* ``ties``: phases at exactly 0, 100, ..., 600 s; the sheet holds the full TCIA id
  ``ISPY2-...``; labels as '1.0' strings -> early = 100 s (index 1), late = 400 s (index 4).
* ``no_tpi``: no TemporalPositionIdentifier / NumberOfTemporalPositions; labels as
  Positive/Negative/Yes/No text -> phases from TriggerTime.
* ``cttp_visit``: StudyDescription ``MR BREAST BILATERAL W WO CONTRAST`` (no token) and folders
  without a token; ClinicalTrialTimePointID ``T0``, ``1``, ``T2``, ``3`` -> visits from CTTP.
* ``folder_visit``: no usable StudyDescription (absent at T0, ``BREAST MRI`` later), no CTTP;
  study folders ``...-ISPY2MRIT<v>-...`` -> visits from the folder names.
* ``truncated_file``: one pre-contrast slice of T2 cut in half (header intact, pixels short) ->
  T2 missing (``unreadable_dicom``: a reason the contract does not name), T0/T1 fine.  (The
  fault ``truncated_last`` cuts the series' last file instead, where an interrupted download
  stops: a phase the reader does not use, so only a reader that checks every file sees it.)
* ``junk_file``: a non-DICOM ``1-999.dcm`` text file inside the T0 DCE folder -> ignore it
  silently, patient fine.
* ``missing_slice``: in T1 the first post-contrast phase that is not a chosen one lacks its
  middle slice -> T1 ``missing_slices`` (every phase is checked, not just the chosen three).
* ``two_phases``: T2 DCE has only 2 phases -> T2 ``missing_phases``.
* ``missing_visit``: no T2 study at all -> T2 missing (``no_study``), T0/T1/T3 fine.
* ``no_dce``: the T1 study holds only a SER series -> T1 ``no_dce_series``.
* ``corrupt_seg``: T0 mask truncated inside its pixel data (header intact); T1 has no mask at
  all -> ``mask_unreadable`` at T0, mask_source ``pe70`` at T0 and T1 (no VOI to carry over).
* ``extra_studies``: a second T1 study with 5 phases (fewer DCE slices than the 7-phase one)
  and a study with no visit token anywhere -> keep the 7-phase T1 (``duplicate_visit``),
  report ``unknown_visit`` and ignore it.
* ``not_in_sheet``: no row in the clinical sheet -> skip ``not_in_clinical_sheet``.
* ``empty_pcr``: the row's pCR cell is empty -> skip ``no_pcr_label``.
* ``dup_conflict``: two sheet rows with the same id and different pCR -> skip
  ``duplicate_clinical_id``.

The tree also holds non-DICOM files a reader must ignore: ``LICENSE``, ``ISPY2/.DS_Store``,
the two xlsx sheets; the clinical sheet has rows for 3 patients that are not downloaded.

Size: the default tree is 24 patients, 62 studies, ~3500 files, ~21 MB; writing it is mostly
pydicom encoding the files.
:data:`DUMMY_CASES` is a 6-patient, ~530-file tree for the TFDS ``dummy_data/``
(``python -m fake_data.tcia_fixtures OUT --dummy``).

Real sizes and vendors: ``Case(size='real')`` writes a visit on the grid of a real series
(:data:`REAL_GRIDS`: uni-lateral 256 x 256 x 88 slices, 616 files / ~90 MB at 7 phases;
bi-lateral 384 x 512 x 256 slices, 1,792 files / ~700 MB, the collection's upper end, which
takes GBs of memory to write), the phantom's maps resampled onto it (its edges extended), rendered and
written one phase at a time (each phase's noise its own stream); such trees are for temporary
directories (``python -m benchmarks.build``, one real-size test), never the repository.
``Case(vendor=...)`` writes the DCE slices in a scanner's header layout (:data:`VENDORS`: which
tags say the phase and its time, the rescale, a realistic load of private elements);
:data:`VENDOR_CASES` holds one fixture-size patient per vendor.

Public API: :class:`Case`, :data:`DEFAULT_CASES`, :data:`DUMMY_CASES`, :data:`FIXTURE_SPEC`,
:data:`VENDOR_CASES`, :data:`VENDORS` (:class:`Layout`), :data:`REAL_GRIDS`,
:class:`PatientTruth` (per-patient expectations), :func:`write_tcia_tree`,
:func:`write_clinical_sheet`, :func:`write_ancillary_sheet`, :func:`render_dce_series`,
:func:`choose_phases`, :func:`volser_codes`, :func:`set_bitflag_mask`, :data:`MASK_LEGEND`
and the bits, :data:`PHI_STRINGS`, :data:`CLINICAL_SHEET_NAME`, :data:`ANCILLARY_SHEET_NAME`.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import pack_bits
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from scipy import ndimage

from tfds_ispy2.ispy2 import phantom, schema

__all__ = [
    'Case',
    'DEFAULT_CASES',
    'FIXTURE_SPEC',
    'PatientTruth',
    'write_tcia_tree',
    'write_clinical_sheet',
    'write_ancillary_sheet',
    'render_dce_series',
    'choose_phases',
    'PHI_STRINGS',
    'CLINICAL_SHEET_NAME',
    'ANCILLARY_SHEET_NAME',
    'CLINICAL_COLUMNS',
    'SEG_SOP_CLASS_UID',
    'FAULTS',
    'DUMMY_CASES',
    'MASK_FORMS',
    'MASK_LEGEND',
    'MASK_LEGEND_TAG',
    'PE_BIT',
    'SER_BIT',
    'BACKGROUND_BIT',
    'VOI_BIT',
    'volser_codes',
    'set_bitflag_mask',
    'Layout',
    'VENDORS',
    'VENDOR_CASES',
    'REAL_GRIDS',
]

CLINICAL_SHEET_NAME = 'ISPY2-Imaging-Cohort-1-Clinical-Data.xlsx'
ANCILLARY_SHEET_NAME = 'Full-Collection-Ancillary-Patient-Information-file.xlsx'
CLINICAL_COLUMNS = (
    'Patient_ID',
    'Arm',
    'HR',
    'HER2',
    'MP',
    'pCR',
    'Age',
    'Race',
    'Ethnicity',
    'Menopausal_Status',
)
ANCILLARY_COLUMNS = ('TCIA PATIENT ID', 'I-SPY 2 Research ID')
SEG_SOP_CLASS_UID = '1.2.840.10008.5.1.4.1.1.66.4'

# The phantom grid of the fixtures: small, so the default tree writes in a few seconds.
FIXTURE_SPEC = phantom.PhantomSpec(
    num_patients=64, shape=(8, 40, 40), spacing_mm=(5.0, 3.0, 3.0), seed=0
)

# PHI-like values written into headers / the sheet; none may reach the reader's output.
PATIENT_NAME = 'Doe^Jane'
INSTITUTION = 'Springfield General Hospital'
REFERRING = 'Hibbert^Julius'
OPERATOR = 'Flanders^Maude'
PHI_STRINGS = (
    PATIENT_NAME,
    'Doe',
    INSTITUTION,
    REFERRING,
    OPERATOR,
    '742 Evergreen Terrace',
)

FAULTS = (
    'truncated_file',
    'truncated_last',
    'junk_file',
    'missing_slice',
    'two_phases',
    'no_dce',
    'corrupt_seg',
    'no_seg',
    'duplicate_visit',
    'unknown_study',
)

# DCE grids of real series ((D, H, W) voxels of (dz, dy, dx) mm; W is one breast's columns, a
# bi-lateral series has twice as many), for ``Case.size == 'real'``.  Uni-lateral: 256 x 256 x 88
# slices (the collection's cropped series are 256 x 256, 80-100 slices; 7 phases: 616 files,
# ~ 90 MB); bi-lateral: 384 x 512 x 256 slices, the upper end of the collection (7 phases: 1,792
# files, ~ 700 MB).  The phantom is rendered on its coarse grid and its maps resampled (labels
# nearest, the rest linear, the edges extended) onto these larger fields of view.
REAL_GRIDS = {
    'uni': ((88, 256, 256), (2.0, 0.7, 0.7)),
    'bi': ((256, 384, 256), (0.8, 0.7, 0.7)),
}

MASK_FORMS = (
    'bitflags',
    'bitflags_per_frame',
    'bitflags_no_legend',
    'seg',
    'seg_excluded',
)
# The collection's Analysis Mask: per voxel an OR of exclusion bits (0 = FTV); the private Mask
# Legend (0117,10D3) spells them out. The first three entries are those of a real ACRIN-6698 mask;
# the wording of the fourth is not known (bit 32 is the documented manual-VOI bit).
MASK_LEGEND_TAG = (0x0117, 0x10D3)
MASK_LEGEND = (
    '00000001 ( 1) : PE threshold',
    '00000010 ( 2) : other SER filter',
    '00010000 (16) : automatic background',
    '00100000 (32) : manual VOI',
)
PE_BIT, SER_BIT, BACKGROUND_BIT, VOI_BIT = 1, 2, 16, 32
_MASK_PRIVATE_CREATOR = 'UCSF VOLSER'

_UID_PREFIX = pydicom.uid.PYDICOM_ROOT_UID  # '1.2.826.0.1.3680043.8.498.'
_IMPL_VERSION = 'PCRJAX_TCIA_FX'
_SEG_EXTRA_BELOW, _SEG_EXTRA_ABOVE = 1, 3
_NODE_RADIUS_MM = 13.0
_STUDY_STYLES = ('ISPY2MRIT{v}', 'ISPY2_MRI_T{v}', 'ISPY2 MRI T{v}', 'MRI T{v}')
_NO_TOKEN_DESCRIPTION = 'MR BREAST BILATERAL W WO CONTRAST'


# ----------------------------------------------------------------------------- vendors
class Layout(NamedTuple):
  """How a scanner writes a DCE series' headers: what says the phase and its time, the scaling,
  and the private elements it leaves (numbers and codes, no PHI) around the standard ones.
  """

  manufacturer: str | None  # None: drawn per patient (the fixtures' own layout)
  model: str
  temporal_position: (
      bool  # TemporalPositionIdentifier + NumberOfTemporalPositions
  )
  trigger: (
      str | None
  )  # TriggerTime: 'phase' (the phase's start, ms), 'zero' (0 everywhere), None
  acquisition: str  # AcquisitionTime: 'phase' (each phase's start) or 'series' (the series' start)
  rescale: (
      tuple[float, float] | None
  )  # (RescaleSlope, RescaleIntercept), or none written
  private: tuple  # ((group, private creator, ((element, VR, value), ...)), ...)


def _private_block(
    group: int, creator: str, count: int, blobs: Sequence[int] = ()
) -> tuple:
  """A private block of ``count`` short values and OB blobs of ``blobs`` bytes (text padded to an
  even length): what a header parser must step over, at about a real scanner's size.
  """
  kinds = (
      ('SS', lambda i: i % 7 - 3),
      ('DS', lambda i: f'{i * 0.125:g}'),
      ('LO', lambda i: f'PARAM_{i:03d}'),
      ('SL', lambda i: i * 1009),
      ('US', lambda i: i),
      ('FL', lambda i: i / 8.0),
  )
  elements = [
      (0x01 + i, kinds[i % 6][0], kinds[i % 6][1](i)) for i in range(count)
  ]
  text = b'sKSpace.lBaseResolution = 256\nsSliceArray.asSlice[0].dThickness = 2.0\n'
  elements += [
      (0x80 + n, 'OB', (text * (size // len(text) + 1))[: size + size % 2])
      for n, size in enumerate(blobs)
  ]
  return group, creator, tuple(elements)


# The three vendors of the collection (patients: GE 703, Siemens 269, Philips 134).  GE says the
# phase by TemporalPositionIdentifier and its time by TriggerTime, with one AcquisitionTime for
# the series and no rescale; Siemens has neither TemporalPositionIdentifier nor TriggerTime, only
# the AcquisitionTime of each phase (and its CSA headers, ~22 kB); Philips writes
# TemporalPositionIdentifier, TriggerTime 0 on every slice, the AcquisitionTime of each phase,
# RescaleSlope / Intercept and its private MR scale slope / intercept (2005,100E / 100D), which
# give the 'floating point' values that a reader of displayed values does not use.
VENDORS = {
    'GE': Layout(
        'GE MEDICAL SYSTEMS',
        'DISCOVERY MR750',
        True,
        'phase',
        'series',
        None,
        (
            _private_block(0x0009, 'GEMS_IDEN_01', 6),
            _private_block(0x0019, 'GEMS_ACQU_01', 60),
            _private_block(0x0021, 'GEMS_RELA_01', 30),
            _private_block(0x0043, 'GEMS_PARM_01', 40, (1024, 2048)),
        ),
    ),
    'Siemens': Layout(
        'SIEMENS',
        'Skyra',
        False,
        None,
        'phase',
        None,
        (
            _private_block(0x0019, 'SIEMENS MR HEADER', 16),
            _private_block(0x0029, 'SIEMENS CSA HEADER', 4, (6144, 16384)),
            _private_block(0x0051, 'SIEMENS MR HEADER', 12),
        ),
    ),
    'Philips': Layout(
        'Philips Medical Systems',
        'Achieva dStream',
        True,
        'zero',
        'phase',
        (2.36264, 0.0),
        (
            _private_block(0x2001, 'Philips Imaging DD 001', 50),
            (
                0x2005,
                'Philips MR Imaging DD 001',
                ((0x0D, 'FL', 0.0), (0x0E, 'FL', 0.0123457)),
            ),
            _private_block(0x2005, 'Philips MR Imaging DD 002', 60, (1536,)),
        ),
    ),
}


# ----------------------------------------------------------------------------- cases
@dataclasses.dataclass(frozen=True)
class Case:
  """One fake TCIA patient: which phantom patient, how it was acquired, and what is broken.

  Attributes:
    name: short key of the case (see the module docstring).
    tcia_id: DICOM PatientID, e.g. ``ISPY2-100101`` or ``ACRIN-6698-102345``.
    research_id: numeric I-SPY 2 research id used by the clinical sheet.
    phantom_index: patient index in the phantom cohort (:data:`FIXTURE_SPEC`).
    num_phases: DCE phases (5-9) of every visit (faults may change one visit).
    visits: visits with a study on disk (a phantom-missing visit is dropped too).
    orientation: ``axial`` (IOP [1,0,0,0,1,0]), ``oblique`` (17 deg about (1,1,0)),
      ``flipped`` (rows right-to-left, negative normal, files in reverse order) or
      ``sagittal`` (IOP [0,1,0,0,0,-1]: slices stacked right-to-left).
    visit_spacing: ``((visit, (dz, dy, dx)), ...)``: visits on a grid other than the phantom's
      (same physical field of view, resampled from the phantom maps).
    laterality: ``uni`` (uni-lateral cropped DCE + mask), ``bi`` (bi-lateral only) or
      ``both`` (bi-lateral and uni-lateral DCE and masks at the visits in ``both_visits``).
    both_visits: visits with both series when ``laterality == 'both'``.
    phase_schedule: ``regular`` (first post 60-100 s, then every 55-180 s up to >= 470 s) or
      ``ties`` (exactly 0, 100, 200, ... s).
    temporal_position: write TemporalPositionIdentifier / NumberOfTemporalPositions.
    visit_source: where the visit is written: ``description`` (StudyDescription + CTTP +
      folder), ``cttp`` (ClinicalTrialTimePointID only) or ``folder`` (folder name only).
    rescale: ``(slope, intercept)`` written as RescaleSlope / RescaleIntercept, or None.
    mask: form of the Analysis Masks (:data:`MASK_FORMS`): ``bitflags`` (the collection's
      8-bit exclusion flags with a Mask Legend, shared plane orientation),
      ``bitflags_per_frame`` (the same, orientation per frame), ``bitflags_no_legend`` (no
      Mask Legend: the documented bits), ``seg`` (a BINARY SEG, one segment per exclusion
      bit) or ``seg_excluded`` (a BINARY SEG with one segment ``excluded``: no VOI).
    node_mm: centre (z, y, x mm, phantom frame) of an enhancing lymph node outside the VOI,
      larger than the tumour, at every visit; None for no node.
    derived: ``((kind, visit), ...)`` extra derived series (``SER``, ``PE2``) to be ignored.
    sheet: how the patient appears in the clinical sheet: ``numeric``, ``tcia_id``, ``absent``,
      ``empty_pcr``, ``duplicate_conflict`` or ``duplicate_same``.
    label_style: encoding of HR / HER2 / pCR cells: ``int`` (1/0), ``float`` (1.0),
      ``str_float`` ('1.0'), ``text`` (Positive/Negative, Yes/No).
    faults: ``((fault, visit), ...)`` with fault in :data:`FAULTS`.
    study_style: index into the StudyDescription spellings (``ISPY2MRIT0``, ``ISPY2_MRI_T0``, ...).
    size: ``fixture`` (the phantom's coarse grid: small, fast trees) or ``real`` (the DCE grid of a
      real series, :data:`REAL_GRIDS`: uni-lateral, or bi-lateral when ``laterality == 'bi'``;
      written one phase at a time, so that a 700 MB series never sits in memory whole).
    vendor: None (the fixtures' own layout, set by ``temporal_position`` and ``rescale``) or
      ``GE``, ``Siemens``, ``Philips``: that scanner's header layout (:data:`VENDORS`), which
      then decides the timing tags, the rescale and the private elements.
  """

  name: str
  tcia_id: str
  research_id: int
  phantom_index: int
  num_phases: int = 7
  visits: tuple[int, ...] = (0, 1, 2, 3)
  orientation: str = 'axial'
  visit_spacing: tuple[tuple[int, tuple[float, float, float]], ...] = ()
  laterality: str = 'uni'
  both_visits: tuple[int, ...] = (0,)
  phase_schedule: str = 'regular'
  temporal_position: bool = True
  visit_source: str = 'description'
  rescale: tuple[float, float] | None = None
  mask: str = 'bitflags'
  node_mm: tuple[float, float, float] | None = None
  derived: tuple[tuple[str, int], ...] = ()
  sheet: str = 'numeric'
  label_style: str = 'int'
  faults: tuple[tuple[str, int], ...] = ()
  study_style: int = 0
  size: str = 'fixture'
  vendor: str | None = None

  def __post_init__(self):
    if not 2 <= self.num_phases <= 12:
      raise ValueError(f'{self.name}: num_phases {self.num_phases}')
    if self.orientation not in ('axial', 'oblique', 'flipped', 'sagittal'):
      raise ValueError(f'{self.name}: orientation {self.orientation!r}')
    if self.laterality not in ('uni', 'bi', 'both'):
      raise ValueError(f'{self.name}: laterality {self.laterality!r}')
    if self.visit_source not in ('description', 'cttp', 'folder'):
      raise ValueError(f'{self.name}: visit_source {self.visit_source!r}')
    if self.sheet not in (
        'numeric',
        'tcia_id',
        'absent',
        'empty_pcr',
        'duplicate_conflict',
        'duplicate_same',
    ):
      raise ValueError(f'{self.name}: sheet {self.sheet!r}')
    if self.label_style not in ('int', 'float', 'str_float', 'text'):
      raise ValueError(f'{self.name}: label_style {self.label_style!r}')
    if self.mask not in MASK_FORMS:
      raise ValueError(f'{self.name}: mask {self.mask!r}')
    if self.node_mm is not None and self.laterality != 'uni':
      raise ValueError(f'{self.name}: a node needs a uni-lateral series')
    for fault, v in self.faults:
      if fault not in FAULTS or v not in self.visits:
        raise ValueError(f'{self.name}: fault {(fault, v)}')
    if 0 not in self.visits:
      raise ValueError(f'{self.name}: T0 must be written')
    if self.size not in ('fixture', 'real') or (
        self.size == 'real' and self.visit_spacing
    ):
      raise ValueError(
          f'{self.name}: size {self.size!r} (a real-size case has one grid)'
      )
    if self.vendor is not None and (
        self.vendor not in VENDORS
        or self.rescale is not None
        or not self.temporal_position
    ):
      raise ValueError(
          f'{self.name}: vendor {self.vendor!r} (its layout sets the timing tags'
          ' and the rescale)'
      )

  def has(self, fault: str, visit: int) -> bool:
    return (fault, visit) in self.faults

  @property
  def prefix(self) -> str:
    return 'ACRIN-6698' if self.tcia_id.startswith('ACRIN') else 'ISPY2'

  @property
  def layout(self) -> Layout:
    """How the DCE slices' headers say time and scale: the vendor's, or the fixtures' own."""
    if self.vendor is not None:
      return VENDORS[self.vendor]
    return Layout(
        None,
        'DISCOVERY MR750',
        self.temporal_position,
        'phase',
        'phase',
        self.rescale,
        (),
    )


DEFAULT_CASES: tuple[Case, ...] = (
    Case(
        'standard',
        'ISPY2-100101',
        100101,
        4,
        derived=(('SER', 0), ('PE2', 1)),
        sheet='duplicate_same',
    ),
    Case(
        'oblique',
        'ISPY2-100117',
        100117,
        3,
        num_phases=6,
        orientation='oblique',
        rescale=(2.0, 0.0),
        study_style=1,
        mask='bitflags_per_frame',
    ),
    Case(
        'flipped',
        'ISPY2-100134',
        100134,
        13,
        num_phases=8,
        visits=(0, 1),
        orientation='flipped',
        study_style=2,
        label_style='float',
        mask='bitflags_no_legend',
    ),
    Case(
        'sagittal',
        'ISPY2-100384',
        100384,
        5,
        visits=(0, 1),
        orientation='sagittal',
    ),
    Case(
        'spacing',
        'ISPY2-100152',
        100152,
        1,
        visit_spacing=(
            (1, (3.0, 2.0, 2.0)),
            (2, (4.0, 2.4, 2.0)),
            (3, (4.5, 2.5, 2.5)),
        ),
        study_style=3,
        mask='seg',
    ),
    Case(
        'node',
        'ISPY2-100392',
        100392,
        42,
        visits=(0, 1, 2),
        node_mm=(0.0, 0.0, 30.0),
        faults=(('no_seg', 1),),
    ),
    Case(
        'bilateral',
        'ISPY2-100178',
        100178,
        0,
        visits=(0, 1, 3),
        laterality='bi',
    ),
    Case(
        'uni_and_bi',
        'ISPY2-100183',
        100183,
        8,
        num_phases=9,
        visits=(0, 1),
        laterality='both',
        mask='seg_excluded',
        rescale=(1.0, 0.0),
    ),
    Case(
        'acrin',
        'ACRIN-6698-102345',
        876543,
        36,
        num_phases=5,
        visits=(0, 1, 2),
        rescale=(1.0, -50.0),
    ),
    Case(
        'ties',
        'ISPY2-100209',
        100209,
        40,
        visits=(0, 1),
        phase_schedule='ties',
        sheet='tcia_id',
        label_style='str_float',
        study_style=1,
    ),
    Case(
        'no_tpi',
        'ISPY2-100215',
        100215,
        11,
        num_phases=6,
        visits=(0, 1),
        temporal_position=False,
        label_style='text',
    ),
    Case('cttp_visit', 'ISPY2-100236', 100236, 14, visit_source='cttp'),
    Case('folder_visit', 'ISPY2-100240', 100240, 12, visit_source='folder'),
    Case(
        'truncated_file',
        'ISPY2-100257',
        100257,
        16,
        visits=(0, 1, 2),
        faults=(('truncated_file', 2),),
    ),
    Case(
        'junk_file',
        'ISPY2-100263',
        100263,
        45,
        visits=(0, 1),
        faults=(('junk_file', 0),),
        study_style=2,
    ),
    Case(
        'missing_slice',
        'ISPY2-100278',
        100278,
        20,
        visits=(0, 1),
        faults=(('missing_slice', 1),),
    ),
    Case(
        'two_phases',
        'ISPY2-100281',
        100281,
        21,
        visits=(0, 2),
        faults=(('two_phases', 2),),
    ),
    Case('missing_visit', 'ISPY2-100299', 100299, 46, visits=(0, 1, 3)),
    Case(
        'no_dce',
        'ISPY2-100302',
        100302,
        23,
        visits=(0, 1),
        faults=(('no_dce', 1),),
    ),
    Case(
        'corrupt_seg',
        'ISPY2-100316',
        100316,
        24,
        visits=(0, 1),
        faults=(('corrupt_seg', 0), ('no_seg', 1)),
    ),
    Case(
        'extra_studies',
        'ISPY2-100327',
        100327,
        25,
        visits=(0, 1),
        faults=(('duplicate_visit', 1), ('unknown_study', 0)),
    ),
    Case(
        'not_in_sheet', 'ISPY2-100331', 100331, 26, visits=(0,), sheet='absent'
    ),
    Case(
        'empty_pcr', 'ISPY2-100345', 100345, 29, visits=(0,), sheet='empty_pcr'
    ),
    Case(
        'dup_conflict',
        'ISPY2-100358',
        100358,
        33,
        visits=(0,),
        sheet='duplicate_conflict',
    ),
)

_BY_NAME = {c.name: c for c in DEFAULT_CASES}
# A small tree for the TFDS `dummy_data/` (about 530 files, 3 MB): 5 patients are written as
# examples (one uni-lateral axial with a SER, one oblique pCR whose T3 mask has an empty FTV, one
# ACRIN 5-phase, one bilateral with a standard BINARY SEG, and the node patient, whose T1 has no
# mask) and 1 is skipped (not in the clinical sheet); the other masks are in the bit-flag form.
DUMMY_CASES: tuple[Case, ...] = (
    dataclasses.replace(
        _BY_NAME['standard'],
        visits=(0, 1),
        derived=(('SER', 0),),
        sheet='numeric',
    ),
    dataclasses.replace(_BY_NAME['oblique'], visits=(0, 3)),
    dataclasses.replace(_BY_NAME['acrin'], visits=(0, 1)),
    dataclasses.replace(_BY_NAME['bilateral'], visits=(0,), mask='seg'),
    dataclasses.replace(_BY_NAME['node'], visits=(0, 1)),
    _BY_NAME['not_in_sheet'],
)

# One fixture-size patient per vendor layout (:data:`VENDORS`), T0 and T1: each must be read with
# its own timing tags and scaling (e.g. Philips' TriggerTime 0 must not make every phase time 0).
VENDOR_CASES: tuple[Case, ...] = tuple(
    Case(
        f'vendor_{vendor.lower()}',
        f'ISPY2-10050{n}',
        100500 + n,
        index,
        visits=(0, 1),
        vendor=vendor,
    )
    for n, (vendor, index) in enumerate(zip(VENDORS, (6, 7, 9)))
)


# ----------------------------------------------------------------------------- ground truth
@dataclasses.dataclass(frozen=True, eq=False)
class PatientTruth:
  """What a correct reader must produce for one written patient (physical units, LPS mm).

  Per-visit sequences have length 4 (T0..T3).  ``visit_mask``, ``phase_*``, ``mask_source``
  are the expectations *after* the reader's rules (a visit with a fault is missing).
  Centroids / volumes are on the chosen DCE series' grid: of the phantom's tumour (``tumor_*``)
  and of the chosen Analysis Mask's FTV (``ftv_*``, its zero voxels: what VOLSER computed from
  the written images inside the VOI); NaN centroid and 0 volume where there is none (pCR, no
  mask) or the visit is missing.  ``crop_center_mm`` is where the reader must centre a visit:
  the FTV centroid, else (empty FTV) the VOI's, when the visit has a mask; the tumour's without
  one (PE >= 70 %); the T0 crop centre when neither exists.
  """

  case: Case
  tcia_id: str
  research_id: str
  phantom_spec: phantom.PhantomSpec
  phantom_index: int
  pcr: int | None  # label in the sheet (None: empty cell / not in the sheet)
  subtype: int
  arm: str
  expected_skip: (
      str | None
  )  # not_in_clinical_sheet / no_pcr_label / duplicate_clinical_id
  visit_mask: np.ndarray  # bool [4]
  visit_reasons: tuple  # per visit: None (present) or why it is missing
  phase_indices: (
      np.ndarray
  )  # int [4, 3] chosen (pre, early, late) indices, -1 if missing
  phase_times_s: np.ndarray  # float32 [4, 3], zeros for a missing visit
  all_phase_times_s: (
      tuple  # per visit: float array of every phase of the chosen series
  )
  tumor_centroid_mm: (
      np.ndarray
  )  # float [4, 3] LPS of the phantom tumour, NaN if none / missing
  tumor_volume_mm3: (
      np.ndarray
  )  # float [4] phantom tumour voxel count x voxel volume
  ftv_centroid_mm: (
      np.ndarray
  )  # float [4, 3] LPS of the mask's FTV, NaN if empty / no mask
  ftv_volume_mm3: (
      np.ndarray
  )  # float [4] the mask's FTV voxel count x its voxel volume
  voi_centroid_mm: (
      np.ndarray
  )  # float [4, 3] LPS of the mask's VOI on the DCE planes, or NaN
  node_centroid_mm: (
      np.ndarray
  )  # float [4, 3] LPS of the enhancing node (Case.node_mm), or NaN
  crop_center_mm: (
      np.ndarray
  )  # float [4, 3] where the reader must centre each visit
  phantom_volume_mm3: (
      np.ndarray
  )  # float [4] analytic phantom volume (PatientTruth of phantom)
  phantom_to_lps: (
      tuple  # per visit: 4x4 affine, phantom voxel (k, j, i, 1) -> LPS mm
  )
  mask_source: (
      tuple  # per visit: 'analysis_mask_bitflags', 'analysis_mask_seg',
  )
  # 'pe70_in_voi', 'pe70' or None (missing)
  dce_geometry: (
      tuple  # per visit: dict(origin, direction, spacing, size) or None
  )
  dce_series_description: (
      tuple  # per visit: SeriesDescription of the DCE to choose, or None
  )
  dce_dirs: tuple  # per visit: chosen DCE series folder (relative to root)
  mask_paths: (
      tuple  # per visit: the chosen Analysis Mask file (relative), or None
  )
  study_reports: (
      tuple  # (reason, visit label or None) study-level reports expected
  )
  faults_applied: tuple  # (fault, visit) actually written
  phi: tuple  # PHI-like strings written for this patient


# ----------------------------------------------------------------------------- small helpers
def _crc(text: str) -> int:
  return zlib.crc32(text.encode('utf-8'))


def _rng(seed: int, *keys) -> np.random.Generator:
  words = [int(seed)] + [
      _crc(k) if isinstance(k, str) else int(k) for k in keys
  ]
  return np.random.default_rng(np.random.SeedSequence(words))


def _uid(seed: int, *keys) -> str:
  return generate_uid(
      _UID_PREFIX,
      ['|'.join(['pcrjax-tcia', str(seed)] + [str(k) for k in keys])],
  )


def _ds(x: float) -> str:
  """DICOM DS string (<= 16 characters, no exponent, no '-0')."""
  x = float(x)
  if x == 0.0 or abs(x) < 5e-9:
    return '0'
  for p in (10, 9, 8, 7, 6):
    s = format(x, f'.{p}g')
    if 'e' not in s and len(s) <= 16:
      return s
  return f'{x:.6f}'.rstrip('0').rstrip('.')


def _tm(seconds: float) -> str:
  us = int(round(seconds * 1e6))
  h, rem = divmod(us, 3600 * 10**6)
  m, rem = divmod(rem, 60 * 10**6)
  s, us = divmod(rem, 10**6)
  return f'{h:02d}{m:02d}{s:02d}.{us:06d}'


def _da(d: datetime.date) -> str:
  return d.strftime('%Y%m%d')


def choose_phases(times_s) -> tuple[int, int, int]:
  """(pre, early, late) phase indices: 0, post-contrast closest to 150 s / 450 s (ties: earlier)."""
  t = np.asarray(times_s, np.float64)
  post = t[1:]
  early = 1 + int(
      np.argmin(np.abs(post - 150.0))
  )  # argmin keeps the first (earlier) of ties
  late = 1 + int(np.argmin(np.abs(post - 450.0)))
  return 0, early, late


def _phase_times(rng: np.random.Generator, n: int, schedule: str) -> np.ndarray:
  """Phase times (s after injection), rounded to the millisecond; the first is 0 (pre)."""
  if schedule == 'ties':
    return np.arange(n, dtype=np.float64) * 100.0
  t1 = rng.uniform(60.0, 100.0)
  if n == 2:
    t = np.array([0.0, t1])
  else:
    lo = max(55.0, (470.0 - t1) / (n - 2))
    hi = min(max(lo + 5.0, (620.0 - t1) / (n - 2)), 185.0)
    dt = rng.uniform(lo, hi)
    t = np.concatenate([[0.0], t1 + dt * np.arange(n - 1)])
  return np.round(t * 1000.0) / 1000.0


def _rotation(axis, degrees: float) -> np.ndarray:
  a = np.asarray(axis, float)
  a /= np.linalg.norm(a)
  th = math.radians(degrees)
  k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
  return np.eye(3) + math.sin(th) * k + (1 - math.cos(th)) * (k @ k)


def _axes(orientation: str) -> np.ndarray:
  """Columns: LPS directions of the phantom's +x (column), +y (row) and +z (slice) axes."""
  if orientation == 'axial':
    return np.eye(3)
  if orientation == 'oblique':
    return _rotation((1.0, 1.0, 0.0), 17.0)
  if (
      orientation == 'flipped'
  ):  # rows right-to-left; the slice stack still runs I -> S
    return np.diag([-1.0, 1.0, 1.0])
  if (
      orientation == 'sagittal'
  ):  # rows anterior -> posterior, columns down, slices to the right
    return np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
  raise ValueError(orientation)


# ----------------------------------------------------------------------------- geometry
@dataclasses.dataclass(frozen=True)
class _Grid:
  """A voxel grid of arrays [k, j, i] = (slice, row, column) placed in LPS space."""

  shape: tuple[int, int, int]  # D, H, W
  spacing: tuple[float, float, float]  # dz (slice), dy (row), dx (column)
  center: np.ndarray  # LPS of the grid centre
  axes: np.ndarray  # [3, 3] columns: LPS of +i, +j, +k

  @property
  def u_row(self):
    return self.axes[:, 0]

  @property
  def u_col(self):
    return self.axes[:, 1]

  @property
  def u_slc(self):
    return self.axes[:, 2]

  @property
  def normal(self):
    return np.cross(self.u_row, self.u_col)

  @property
  def origin(self) -> np.ndarray:
    d, h, w = self.shape
    dz, dy, dx = self.spacing
    return (
        self.center
        - (w - 1) / 2 * dx * self.u_row
        - (h - 1) / 2 * dy * self.u_col
        - (d - 1) / 2 * dz * self.u_slc
    )

  def ipp(self, k: float) -> np.ndarray:
    return self.origin + k * self.spacing[0] * self.u_slc

  @property
  def iop(self) -> list[float]:
    return list(self.u_row) + list(self.u_col)

  def lps(self, kji: np.ndarray) -> np.ndarray:
    """LPS (mm) of voxel indices [..., 3] in (k, j, i) order."""
    kji = np.asarray(kji, float)
    dz, dy, dx = self.spacing
    return (
        self.origin
        + kji[..., 2:3] * dx * self.u_row
        + kji[..., 1:2] * dy * self.u_col
        + kji[..., 0:1] * dz * self.u_slc
    )

  def sorted_ks(self) -> list[int]:
    """Slice indices in the order of increasing dot(IPP, normal) (the reader's order)."""
    ks = list(range(self.shape[0]))
    return ks if float(self.u_slc @ self.normal) > 0 else ks[::-1]

  def sitk_geometry(self) -> dict:
    """What SimpleITK reports for the phase volume sorted along the normal."""
    ks = self.sorted_ks()
    d, h, w = self.shape
    dz, dy, dx = self.spacing
    direction = np.stack([self.u_row, self.u_col, self.normal], axis=1)
    return dict(
        origin=tuple(float(x) for x in self.ipp(ks[0])),
        direction=tuple(float(x) for x in direction.ravel()),
        spacing=(float(dx), float(dy), float(dz)),
        size=(w, h, d),
    )

  def canvas(self) -> _Grid:
    """Bilateral field of view: the same grid extended by W columns towards -i."""
    d, h, w = self.shape
    return _Grid(
        (d, h, 2 * w),
        self.spacing,
        self.center - w * self.spacing[2] / 2 * self.u_row,
        self.axes,
    )


def _phantom_grid_coords(grid: _Grid):
  """Phantom-frame (z, y, x) mm of a grid's voxel centres (the grid is centred on the phantom)."""
  d, h, w = grid.shape
  dz, dy, dx = grid.spacing
  return (
      (np.arange(d) - (d - 1) / 2) * dz,
      (np.arange(h) - (h - 1) / 2) * dy,
      (np.arange(w) - (w - 1) / 2) * dx,
  )


# ----------------------------------------------------------------------------- physics
_MAP_KEYS = ('labels', 'ktrans_per_min', 've', 'vp', 't10_s', 'bias')
_RESAMPLE_SLICES = 16  # slices of a resampled grid per map_coordinates call
_PHYSICS_SLICES = 32  # slices of a phase per signal-equation slab
_M0_BY_LABEL = np.zeros(8)
for _name, _code in phantom.LABELS.items():
  if _name not in ('air', 'fat'):
    _M0_BY_LABEL[_code] = phantom.M0_REL[_name]


def _visit_maps(maps: dict, v: int) -> dict:
  return {k: np.asarray(maps[k][v]) for k in _MAP_KEYS}


def _resample_maps(vm: dict, spec: phantom.PhantomSpec, shape, spacing) -> dict:
  """The phantom maps of one visit on another grid with the same centre and axes (beyond the
  phantom's field of view its edge values go on); a few slices at a time, so that the coordinates
  of a real-size grid never sit in memory whole."""
  grid = _Grid(tuple(shape), tuple(spacing), np.zeros(3), np.eye(3))
  z, y, x = _phantom_grid_coords(grid)
  d0, h0, w0 = spec.shape
  dz0, dy0, dx0 = spec.spacing_mm
  kz = z / dz0 + (d0 - 1) / 2
  jy = y / dy0 + (h0 - 1) / 2
  ix = x / dx0 + (w0 - 1) / 2
  out = {key: np.empty(tuple(shape), arr.dtype) for key, arr in vm.items()}
  for start in range(0, len(kz), _RESAMPLE_SLICES):
    coords = np.stack(
        np.meshgrid(kz[start : start + _RESAMPLE_SLICES], jy, ix, indexing='ij')
    )
    for key, arr in vm.items():
      order = 0 if key == 'labels' else 1
      out[key][start : start + _RESAMPLE_SLICES] = ndimage.map_coordinates(
          arr.astype(np.float32) if order else arr,
          coords,
          order=order,
          mode='nearest',
      )
  return out


def _bilateral_maps(vm: dict) -> dict:
  """The maps of a bi-lateral field of view: the contralateral breast (the mirror image, its
  tumour made fat) beside the imaged one, built in place (a real-size canvas has 50 M voxels).
  """
  out = {
      k: np.concatenate([np.flip(a, axis=-1), a], axis=-1)
      for k, a in vm.items()
  }
  mirror = (slice(None),) * (out['labels'].ndim - 1) + (
      slice(0, vm['labels'].shape[-1]),
  )
  tum = np.isin(
      out['labels'][mirror],
      (phantom.LABELS['tumour'], phantom.LABELS['necrosis']),
  )
  out['labels'][mirror][tum] = phantom.LABELS['fat']
  out['ktrans_per_min'][mirror][tum] = 0.0
  return out


class _Physics:
  """One visit's maps ready for the signal equation: the noise-free signal of any phase.

  A phase is computed in slabs of slices (each with the PSF's reach of neighbours), so that the
  float64 temporaries of a real-size bi-lateral field of view (50 M voxels) stay small; the
  Gaussian PSF is separable and the rest pointwise: the result is the whole volume's, bit for bit.
  """

  def __init__(self, vm: dict, truth, times_s: np.ndarray):
    self.maps = vm
    self.fat_pre = float(
        phantom.spgr_signal(
            phantom.M0_REL['fat'] * truth.fat_residual,
            phantom.T10_S['fat'] * truth.t10_scale,
        )
    )
    self.times = np.asarray(times_s, np.float64)
    self.delay_s = truth.bolus_delay_s
    self.gain = np.float32(truth.gain)
    self.sigma = np.float32(truth.noise_sigma)

  def clean(self, p: int) -> np.ndarray:
    """Phase p (float32 [D, H, W]): Tofts + SPGR (fat: its suppressed residual), PSF, bias, gain."""
    depth = self.maps['labels'].shape[0]
    halo = int(
        4.0 * phantom._PSF_SIGMA_VOX + 0.5
    )  # gaussian_filter's reach (truncate 4)
    out = np.empty(self.maps['labels'].shape, np.float32)
    for start in range(0, depth, _PHYSICS_SLICES):
      stop = min(start + _PHYSICS_SLICES, depth)
      lo, hi = max(start - halo, 0), min(stop + halo, depth)
      m = {k: a[lo:hi] for k, a in self.maps.items()}
      lab = m['labels'].astype(np.int64)
      t10 = np.where(m['t10_s'] > 0, m['t10_s'], 1.0).astype(np.float64)
      c = (
          0.0
          if p == 0
          else phantom.tofts_concentration(
              self.times[p : p + 1],
              m['ktrans_per_min'],
              m['ve'],
              m['vp'],
              delay_s=self.delay_s,
          )[0]
      )
      s = np.where(
          lab == phantom.LABELS['fat'],
          self.fat_pre,
          phantom.spgr_signal(_M0_BY_LABEL[lab], t10, c),
      )
      s = ndimage.gaussian_filter(
          s.astype(np.float32), phantom._PSF_SIGMA_VOX, mode='constant'
      )
      out[start:stop] = s[start - lo : stop - lo] * (
          m['bias'][start - lo : stop - lo].astype(np.float32) * self.gain
      )
    return out

  def rician(
      self, clean: np.ndarray, n1: np.ndarray, n2: np.ndarray
  ) -> np.ndarray:
    """|clean + sigma (n1 + i n2)|, computed in the noise arrays' memory (which it overwrites)."""
    n1 *= self.sigma
    n1 += clean
    np.square(n1, out=n1)
    n2 *= self.sigma
    np.square(n2, out=n2)
    n1 += n2
    return np.sqrt(n1, out=n1)


def _signals(
    vm: dict, truth, times_s: np.ndarray, rng: np.random.Generator | None
):
  """Noise-free and noisy signal [n_phases, D, H, W] (float32) of one visit's maps."""
  physics = _Physics(vm, truth, times_s)
  clean = np.stack([physics.clean(p) for p in range(len(physics.times))])
  if rng is None:
    return clean, clean
  n1 = rng.standard_normal(clean.shape, dtype=np.float32)
  n2 = rng.standard_normal(clean.shape, dtype=np.float32)
  return clean, physics.rician(clean, n1, n2)


@dataclasses.dataclass(frozen=True)
class _Phases:
  """A DCE series' values phase by phase ([D, H, W] each; only the last ``width`` columns when
  set): arrays already rendered (fixture size), or rendered when indexed (real size: one phase in
  memory at a time, each phase's noise from its own stream)."""

  render: Callable[[int], np.ndarray]
  count: int
  width: int | None = None

  @classmethod
  def of(cls, arrays: np.ndarray) -> _Phases:
    return cls(arrays.__getitem__, len(arrays))

  @classmethod
  def lazy(
      cls, physics: _Physics, noise: Callable[[int], np.random.Generator] | None
  ) -> _Phases:
    """Noise-free phases (``noise`` None), or noisy with ``noise(p)`` the stream of phase p."""

    def render(p):
      clean = physics.clean(p)
      if noise is None:
        return clean
      rng = noise(p)
      n1 = rng.standard_normal(clean.shape, dtype=np.float32)
      return physics.rician(
          clean, n1, rng.standard_normal(clean.shape, dtype=np.float32)
      )

    return cls(render, len(physics.times))

  def __len__(self) -> int:
    return self.count

  def __getitem__(self, p: int) -> np.ndarray:
    values = self.render(p)
    return values if self.width is None else values[..., -self.width :]

  def last_columns(self, width: int) -> _Phases:
    """The imaged breast of a bi-lateral field of view."""
    return dataclasses.replace(self, width=width)


def render_dce_series(
    spec: phantom.PhantomSpec,
    index: int,
    visit: int,
    times_s,
    *,
    seed: int = 0,
    noise: bool = True,
) -> np.ndarray:
  """Phantom patient ``index``, ``visit``: DCE signal [len(times_s), D, H, W] on the spec grid.

  The same physics as :func:`phantom.render_patient` at any phase times (tissue labels instead of
  the phantom's fat/FGT partial volume; independent noise).
  """
  _, maps, truth = phantom.render_patient_maps(spec, index)
  if not truth.visit_mask[visit]:
    raise ValueError(f'visit {visit} of phantom patient {index} is missing')
  rng = _rng(seed, 'render', index, visit) if noise else None
  clean, noisy = _signals(_visit_maps(maps, visit), truth, times_s, rng)
  return noisy if noise else clean


# ----------------------------------------------------------------------------- DICOM files
def _file_meta(
    sop_class: str, sop_instance: str | None = None
) -> FileMetaDataset:
  """File meta information (pydicom adds the group length and version when it writes)."""
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = sop_class
  if sop_instance is not None:
    meta.MediaStorageSOPInstanceUID = sop_instance
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
  meta.ImplementationVersionName = _IMPL_VERSION
  return meta


# ----------------------------------------------------------------------------- patient context
@dataclasses.dataclass
class _Study:
  visit: int  # visit written (the truth; -1 for the unknown study)
  label: str  # key for UIDs
  description: str | None  # StudyDescription (None: absent)
  cttp: str | None  # ClinicalTrialTimePointID (None: absent)
  folder: str  # study folder name
  date: datetime.date
  time_s: float  # study start (s after midnight)
  accession: str
  uid: str
  for_uid: str


def _patient_header(ds: Dataset, case: Case, phi: dict, study: _Study):
  ds.SpecificCharacterSet = 'ISO_IR 100'
  ds.StudyDate = _da(study.date)
  ds.SeriesDate = _da(study.date)
  ds.AcquisitionDate = _da(study.date)
  ds.ContentDate = _da(study.date)
  ds.StudyTime = _tm(study.time_s)
  ds.SeriesTime = _tm(study.time_s + 60.0)
  ds.AccessionNumber = study.accession
  ds.Manufacturer = phi['manufacturer']
  ds.InstitutionName = INSTITUTION
  ds.InstitutionAddress = '742 Evergreen Terrace, Springfield'
  ds.ReferringPhysicianName = REFERRING
  ds.StationName = 'MRC3T01'
  if study.description is not None:
    ds.StudyDescription = study.description
  ds.OperatorsName = OPERATOR
  ds.ManufacturerModelName = phi['model']
  ds.PatientName = PATIENT_NAME
  ds.PatientID = case.tcia_id
  ds.PatientBirthDate = phi['birth_date']
  ds.PatientSex = 'F'
  ds.PatientAge = phi['age_str']
  ds.PatientWeight = phi['weight']
  ds.ClinicalTrialSponsorName = 'QuantumLeap Healthcare Collaborative'
  ds.ClinicalTrialProtocolID = (
      'ISPY2' if case.prefix == 'ISPY2' else 'ACRIN-6698'
  )
  ds.ClinicalTrialSiteID = phi['site']
  ds.ClinicalTrialSubjectID = str(case.research_id)
  if study.cttp is not None:
    ds.ClinicalTrialTimePointID = study.cttp
  ds.StudyInstanceUID = study.uid
  ds.StudyID = study.accession[-6:]
  ds.FrameOfReferenceUID = study.for_uid
  ds.PositionReferenceIndicator = ''


def _mr_template(
    case: Case,
    phi: dict,
    study: _Study,
    grid: _Grid,
    *,
    series_uid: str,
    series_number: int,
    description: str,
    n_phases: int | None,
    derived: bool,
    rescale,
) -> Dataset:
  """The elements shared by the slices of one series (per-slice ones: :func:`_set_slice`), the
  layout's private elements included."""
  ds = Dataset()
  ds.file_meta = _file_meta(MRImageStorage)
  ds.ImageType = (
      ['DERIVED', 'SECONDARY', 'OTHER']
      if derived
      else ['ORIGINAL', 'PRIMARY', 'OTHER']
  )
  ds.SOPClassUID = MRImageStorage
  _patient_header(ds, case, phi, study)
  ds.Modality = 'MR'
  ds.SeriesDescription = description
  ds.BodyPartExamined = 'BREAST'
  ds.ScanningSequence = 'GR'
  ds.SequenceVariant = ['SS', 'SP']
  ds.ScanOptions = 'FAST_GEMS' if phi['manufacturer'].startswith('GE') else 'FS'
  ds.MRAcquisitionType = '3D'
  ds.SliceThickness = _ds(grid.spacing[0])
  ds.RepetitionTime = _ds(phantom.TR_S * 1000)
  ds.EchoTime = '2.1'
  ds.EchoTrainLength = 1
  ds.MagneticFieldStrength = phi['field']
  ds.SpacingBetweenSlices = _ds(grid.spacing[0])
  ds.FlipAngle = _ds(phantom.FLIP_DEG)
  ds.PatientPosition = 'FFP'
  ds.ContrastBolusAgent = 'GADAVIST'
  ds.SeriesInstanceUID = series_uid
  ds.SeriesNumber = series_number
  ds.AcquisitionNumber = 1
  ds.ImageOrientationPatient = [_ds(x) for x in grid.iop]
  ds.ImageLaterality = (
      'B'
      if 'bi-lateral' in description
      else 'R'
      if case.orientation == 'flipped'
      else 'L'
  )
  if n_phases is not None:
    ds.NumberOfTemporalPositions = n_phases
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = 'MONOCHROME2'
  ds.Rows = grid.shape[1]
  ds.Columns = grid.shape[2]
  ds.PixelSpacing = [_ds(grid.spacing[1]), _ds(grid.spacing[2])]
  ds.BitsAllocated = 16
  ds.BitsStored = 16
  ds.HighBit = 15
  ds.PixelRepresentation = 0
  ds.WindowCenter = '1200'
  ds.WindowWidth = '2400'
  if rescale is not None:
    ds.RescaleIntercept = _ds(rescale[1])
    ds.RescaleSlope = _ds(rescale[0])
    ds.RescaleType = 'US'
  for group, creator, elements in case.layout.private:
    block = ds.private_block(group, creator, create=True)
    for element, vr, value in elements:
      block.add_new(element, vr, value)
  return ds


def _set_slice(
    ds: Dataset,
    *,
    sop_uid: str,
    acq_s: float,
    trigger_ms: float | None,
    instance: int,
    ipp: np.ndarray,
    slice_location: float,
    phase: int | None,
    pixels: bytes,
) -> None:
  """The per-slice elements of an MR slice (set in place on the series' dataset)."""
  ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
  ds.SOPInstanceUID = sop_uid
  ds.AcquisitionTime = _tm(acq_s)
  ds.ContentTime = _tm(acq_s)
  if trigger_ms is not None:
    ds.TriggerTime = _ds(trigger_ms)
  ds.InstanceNumber = instance
  ds.ImagePositionPatient = [_ds(x) for x in ipp]
  if phase is not None:
    ds.TemporalPositionIdentifier = phase
  ds.SliceLocation = _ds(slice_location)
  ds.PixelData = pixels
  ds['PixelData'].VR = 'OW'


def _to_stored(values: np.ndarray, rescale) -> np.ndarray:
  slope, intercept = rescale if rescale is not None else (1.0, 0.0)
  return np.clip(np.round((values - intercept) / slope), 0, 65535).astype('<u2')


def _read_back(stored: np.ndarray, rescale) -> np.ndarray:
  """The values a reader gets from written slices: the stored integers, rescaled."""
  slope, intercept = rescale if rescale is not None else (1.0, 0.0)
  return stored * slope + intercept


@dataclasses.dataclass
class _WrittenSeries:
  dir: Path
  series_uid: str
  files: list  # per phase: list of (k, path)
  pre_uids: dict  # slice k -> SOPInstanceUID of the pre-contrast slice
  stored: dict  # phase -> stored integers [D, H, W] of the phases asked to keep


def _write_mr_series(
    series_dir: Path,
    case: Case,
    phi: dict,
    study: _Study,
    grid: _Grid,
    volumes: np.ndarray | _Phases,
    times_s: np.ndarray | None,
    *,
    seed: int,
    series_key: str,
    series_number: int,
    description: str,
    layout: Layout,
    skip=(),
    reverse=False,
    keep=(),
) -> _WrittenSeries:
  """Single-frame MR slices of ``volumes`` [n_phases][D, H, W] (float, rescaled units), one phase
  at a time, with the timing tags of ``layout`` (a derived series: none); keeps the stored
  integers of the phases ``keep``."""
  series_dir.mkdir(parents=True, exist_ok=True)
  derived = times_s is None
  n_phases = len(volumes)
  series_uid = _uid(seed, case.tcia_id, study.label, series_key)
  temporal = layout.temporal_position and not derived
  ds = _mr_template(
      case,
      phi,
      study,
      grid,
      series_uid=series_uid,
      series_number=series_number,
      description=description,
      n_phases=n_phases if temporal else None,
      derived=derived,
      rescale=layout.rescale,
  )
  ks = grid.sorted_ks()
  if reverse:
    ks = ks[::-1]
  normal = grid.normal
  result = _WrittenSeries(series_dir, series_uid, [], {}, {})
  instance = 0
  for p in range(n_phases):
    stored = _to_stored(volumes[p], layout.rescale)
    if p in keep:
      result.stored[p] = stored
    t = 0.0 if derived else float(times_s[p])
    acq = study.time_s + 300.0 + (t if layout.acquisition == 'phase' else 0.0)
    trigger = {'phase': round(t * 1000.0), 'zero': 0, None: None}[
        None if derived else layout.trigger
    ]
    phase_files = []
    for k in ks:
      if (p, k) in skip:
        continue
      instance += 1
      ipp = grid.ipp(k)
      sop_uid = _uid(seed, case.tcia_id, study.label, series_key, p, k)
      _set_slice(
          ds,
          sop_uid=sop_uid,
          acq_s=acq,
          trigger_ms=trigger,
          instance=instance,
          ipp=ipp,
          slice_location=float(ipp @ normal),
          phase=p + 1 if temporal else None,
          pixels=stored[k].tobytes(),
      )
      path = series_dir / f'1-{instance:03d}.dcm'
      pydicom.dcmwrite(path, ds, enforce_file_format=True)
      phase_files.append((k, path))
      if p == 0:
        result.pre_uids[k] = sop_uid
    result.files.append(phase_files)
  return result


# ----------------------------------------------------------------------------- Analysis Mask
_SEG_REASONS = (
    (PE_BIT, 'PE threshold'),
    (SER_BIT, 'SER/min neighbour'),
    (BACKGROUND_BIT, 'background threshold'),
    (VOI_BIT, 'manual VOI'),
)
_NEIGHBOURS = np.ones((3, 3, 3), np.uint8)
_NEIGHBOURS[1, 1, 1] = 0  # the 26 neighbours, not the voxel itself


def volser_codes(
    pre: np.ndarray, early: np.ndarray, late: np.ndarray, voi: np.ndarray
) -> tuple[np.ndarray, float]:
  """I-SPY's exclusion bits per voxel (uint8 [D, H, W], 0 = FTV) and the background threshold.

  The UCSF VOLSER rules as the collection documents them, written here and not taken from
  ``pcrjax.ftv`` (which the tests hold against this): S0 >= 0.6 x the 95th percentile of S0 in
  the VOI, PE = 100 (S1 - S0) / S0 >= 70 %, SER >= 0 and >= 4 of the 26 neighbours passing the
  first two.  The flags are hierarchical, which gives exactly the values seen in the collection
  (0x00, 0x01, 0x02, 0x11 and the same | 0x20): below background is flagged background and PE,
  else a failed PE is flagged PE, else SER; bit 32 marks every voxel outside the VOI.  Computed
  in slabs of slices (with the neighbours' slice on each side), bit for bit the whole volume's.
  """
  background = 0.6 * float(np.percentile(np.asarray(pre, np.float64)[voi], 95))
  codes = np.empty(np.shape(pre), np.uint8)
  depth = codes.shape[0]
  for start in range(0, depth, _PHYSICS_SLICES):
    stop = min(start + _PHYSICS_SLICES, depth)
    lo, hi = max(start - 1, 0), min(stop + 1, depth)
    s0, s1, s2 = (np.asarray(a[lo:hi], np.float64) for a in (pre, early, late))
    bright = s0 >= background
    enhancing = (s0 > 0) & (s1 - s0 >= 0.7 * s0)
    passing = bright & enhancing
    neighbours = ndimage.convolve(
        passing.astype(np.uint8), _NEIGHBOURS, mode='constant'
    )
    kept = passing & (neighbours >= 4) & ((s1 - s0) * (s2 - s0) >= 0)
    slab = np.select(
        [~bright, ~enhancing, ~kept],
        [BACKGROUND_BIT | PE_BIT, PE_BIT, SER_BIT],
        0,
    )
    codes[start:stop] = (slab | np.where(voi[lo:hi], 0, VOI_BIT))[
        start - lo : stop - lo
    ]
  return codes, background


def _voi_box(tumour: np.ndarray, center_kji: np.ndarray) -> np.ndarray:
  """The radiologist's VOI: the tumour's box grown by 1 slice and 3 voxels in plane (around the
  expected tumour centre once the tumour is gone)."""
  shape = np.array(tumour.shape)
  if tumour.any():
    idx = np.argwhere(tumour)
    lo, hi = idx.min(0), idx.max(0) + 1
  else:
    c = np.round(center_kji).astype(int)
    lo, hi = c - 1, c + 2
  margin = np.array([1, 3, 3])
  lo, hi = np.clip(lo - margin, 0, shape), np.clip(hi + margin, 0, shape)
  voi = np.zeros(tumour.shape, bool)
  voi[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
  return voi


def _mask_slab(grid: _Grid, codes: np.ndarray) -> tuple[list[int], np.ndarray]:
  """The mask's planes k, ascending along the normal, and their codes: a slab wider than the DCE
  series (1 plane below, 3 above; outside the VOI and below background there).
  """
  d = grid.shape[0]
  ks = list(range(-_SEG_EXTRA_BELOW, d + _SEG_EXTRA_ABOVE))
  if float(grid.u_slc @ grid.normal) < 0:
    ks = ks[::-1]
  beyond = np.full(codes.shape[1:], VOI_BIT | BACKGROUND_BIT | PE_BIT, np.uint8)
  return ks, np.stack([codes[k] if 0 <= k < d else beyond for k in ks])


@dataclasses.dataclass(frozen=True)
class _SegFrame:
  """One SEG frame: a segment on a plane."""

  segment: int  # 1-based segment number
  plane: int  # 1-based index of the plane (ascending along the normal)
  ipp: tuple[str, str, str]  # ImagePositionPatient (DS strings)
  source_uid: (
      str | None
  )  # the pre-contrast DCE slice at this plane (None outside the DCE)


_CODE_TISSUE = ('85756007', 'SCT', 'Tissue')
_CODE_CONNECTIVE = ('21793004', 'SCT', 'Connective tissue')
_CODE_AI = ('123110', 'DCM', 'Artificial Intelligence')
_CODE_SOURCE = ('121322', 'DCM', 'Source image for image processing operation')
_CODE_SEGMENTATION = ('113076', 'DCM', 'Segmentation')


def _code(value) -> Dataset:
  item = Dataset()
  item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value
  return item


def _segment(number: int, label: str) -> Dataset:
  """A SegmentSequence item; the manual VOI is the radiologist's, the rest VOLSER's."""
  item = Dataset()
  item.SegmentedPropertyCategoryCodeSequence = [_code(_CODE_TISSUE)]
  item.SegmentNumber = number
  item.SegmentLabel = label
  if label != 'manual VOI':
    alg = Dataset()
    alg.AlgorithmFamilyCodeSequence = [_code(_CODE_AI)]
    alg.AlgorithmVersion = '2.1'
    alg.AlgorithmName = 'VOLSER'
    item.SegmentationAlgorithmIdentificationSequence = [alg]
    item.SegmentAlgorithmType = 'AUTOMATIC'
    item.SegmentAlgorithmName = 'VOLSER'
  else:
    item.SegmentAlgorithmType = 'MANUAL'
  item.SegmentedPropertyTypeCodeSequence = [_code(_CODE_CONNECTIVE)]
  return item


def _set_frames(
    ds: Dataset,
    frames: Sequence[_SegFrame],
    shape: tuple[int, int],
    orientation: Sequence[float],
    pixel_spacing: Sequence[float],
    slice_spacing: float,
    orientation_per_frame: bool,
) -> None:
  """What both mask forms share: dimensions (segment, position), matrix and functional groups
  (in the layout highdicom writes: measures shared, position, content, segment and derivation
  image per frame; the orientation shared or per frame)."""
  dim_uid = generate_uid(_UID_PREFIX, [ds.SOPInstanceUID, 'dimensions'])
  org = Dataset()
  org.DimensionOrganizationUID = dim_uid
  ds.DimensionOrganizationSequence = [org]
  index_seg, index_pos = Dataset(), Dataset()
  index_seg.DimensionOrganizationUID = dim_uid
  index_seg.DimensionIndexPointer = 0x0062000B  # ReferencedSegmentNumber
  index_seg.FunctionalGroupPointer = 0x0062000A  # SegmentIdentificationSequence
  index_seg.DimensionDescriptionLabel = 'Referenced Segment Number'
  index_pos.DimensionOrganizationUID = dim_uid
  index_pos.DimensionIndexPointer = 0x00200032  # ImagePositionPatient
  index_pos.FunctionalGroupPointer = 0x00209113  # PlanePositionSequence
  index_pos.DimensionDescriptionLabel = 'Image Position Patient'
  ds.DimensionIndexSequence = [index_seg, index_pos]
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = 'MONOCHROME2'
  ds.NumberOfFrames = len(frames)
  ds.Rows, ds.Columns = shape
  ds.PixelRepresentation = 0
  ds.LossyImageCompression = '00'
  plane = Dataset()
  plane.ImageOrientationPatient = [_ds(x) for x in orientation]
  shared = Dataset()
  measures = Dataset()
  measures.SliceThickness = _ds(slice_spacing)
  measures.SpacingBetweenSlices = _ds(slice_spacing)
  measures.PixelSpacing = [_ds(x) for x in pixel_spacing]
  shared.PixelMeasuresSequence = [measures]
  if not orientation_per_frame:
    shared.PlaneOrientationSequence = [plane]
  ds.SharedFunctionalGroupsSequence = [shared]
  ds.PerFrameFunctionalGroupsSequence = []
  for f in frames:
    item = Dataset()
    if f.source_uid is not None:
      source = Dataset()
      source.ReferencedSOPClassUID = MRImageStorage
      source.ReferencedSOPInstanceUID = f.source_uid
      source.PurposeOfReferenceCodeSequence = [_code(_CODE_SOURCE)]
      derivation = Dataset()
      derivation.SourceImageSequence = [source]
      derivation.DerivationCodeSequence = [_code(_CODE_SEGMENTATION)]
      item.DerivationImageSequence = [derivation]
    content = Dataset()
    content.DimensionIndexValues = [f.segment, f.plane]
    item.FrameContentSequence = [content]
    position = Dataset()
    position.ImagePositionPatient = list(f.ipp)
    item.PlanePositionSequence = [position]
    if orientation_per_frame:
      item.PlaneOrientationSequence = [plane]
    ident = Dataset()
    ident.ReferencedSegmentNumber = f.segment
    item.SegmentIdentificationSequence = [ident]
    ds.PerFrameFunctionalGroupsSequence.append(item)


def _slice_spacing(
    positions: np.ndarray, orientation: Sequence[float]
) -> float:
  normal = np.cross(
      np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
  )
  depth = np.sort(np.asarray(positions, float) @ normal)
  return float(np.median(np.diff(depth))) if len(depth) > 1 else 1.0


def set_bitflag_mask(
    ds: Dataset,
    codes: np.ndarray,
    positions: np.ndarray,
    orientation: Sequence[float],
    pixel_spacing: Sequence[float],
    *,
    legend: Sequence[str] | None = MASK_LEGEND,
    orientation_per_frame: bool = False,
    sources: Sequence[str | None] | None = None,
) -> None:
  """Make ``ds`` an Analysis Mask in the collection's form: SEG frames of 8-bit exclusion flags.

  ``codes``: uint8 [frames, rows, columns] (0 = FTV); ``positions``: ImagePositionPatient of each
  frame [frames, 3], in any order; ``orientation``: ImageOrientationPatient (6);
  ``pixel_spacing``: (between rows, between columns) mm; ``legend``: the Mask Legend's values
  (None: no legend); ``sources``: each frame's source DCE SOPInstanceUID or None.  Like the
  collection's, the object is not a valid SEG: FRACTIONAL 8-bit frames whose values are flags,
  not fractions, and no SegmentSequence (highdicom's reader fails on it with an AttributeError).
  """
  codes = np.asarray(codes, np.uint8)
  sources = sources or [None] * len(codes)
  frames = [
      _SegFrame(1, n + 1, tuple(_ds(x) for x in p), uid)
      for n, (p, uid) in enumerate(zip(positions, sources))
  ]
  ds.SOPClassUID = SEG_SOP_CLASS_UID
  ds.Modality = 'SEG'
  _set_frames(
      ds,
      frames,
      codes.shape[1:],
      orientation,
      pixel_spacing,
      _slice_spacing(positions, orientation),
      orientation_per_frame,
  )
  ds.BitsAllocated = 8
  ds.BitsStored = 8
  ds.HighBit = 7
  ds.SegmentationType = 'FRACTIONAL'
  ds.SegmentationFractionalType = 'PROBABILITY'
  ds.MaximumFractionalValue = 255
  if legend is not None:
    block = ds.private_block(
        MASK_LEGEND_TAG[0], _MASK_PRIVATE_CREATOR, create=True
    )
    block.add_new(MASK_LEGEND_TAG[1] & 0xFF, 'LO', list(legend))
  ds.PixelData = codes.tobytes()
  ds['PixelData'].VR = 'OB'


def _set_binary_segments(
    ds: Dataset,
    reasons: Sequence[tuple[str, np.ndarray]],
    grid: _Grid,
    ks: Sequence[int],
    sources: dict,
) -> None:
  """The standard form: a BINARY SEG, one segment per exclusion reason (``reasons``: label and
  bits [planes, H, W] on the planes ``ks``); empty frames omitted, as highdicom does.
  """
  frames, bits = [], []
  for s, (_, planes) in enumerate(reasons):
    for n, (k, frame) in enumerate(zip(ks, planes)):
      if frame.any():
        frames.append(
            _SegFrame(
                s + 1, n + 1, tuple(_ds(x) for x in grid.ipp(k)), sources.get(k)
            )
        )
        bits.append(frame)
  _set_frames(
      ds,
      frames,
      grid.shape[1:],
      grid.iop,
      grid.spacing[1:],
      grid.spacing[0],
      False,
  )
  ds.BitsAllocated = 1
  ds.BitsStored = 1
  ds.HighBit = 0
  ds.SegmentationType = 'BINARY'
  ds.SegmentSequence = [
      _segment(n + 1, label) for n, (label, _) in enumerate(reasons)
  ]
  ds.SegmentsOverlap = 'YES' if len(reasons) > 1 else 'NO'
  ds.PixelData = pack_bits(np.stack(bits).astype(np.uint8).ravel(), pad=True)
  ds['PixelData'].VR = 'OB'


def _mask_header(
    case: Case,
    phi: dict,
    study: _Study,
    *,
    series_uid: str,
    sop_uid: str,
    series_number: int,
    description: str,
    source_series_uid: str,
    source_uids: dict,
    background: float,
) -> Dataset:
  """The elements of an Analysis Mask that do not depend on its form, file meta included."""
  ds = Dataset()
  ds.file_meta = _file_meta(SEG_SOP_CLASS_UID, sop_uid)
  _patient_header(ds, case, phi, study)
  del ds.AcquisitionDate  # not in the Segmentation IOD
  for key in (
      'InstitutionName',
      'InstitutionAddress',
      'StationName',
      'OperatorsName',
  ):
    delattr(ds, key)
  ds.ImageType = ['DERIVED', 'PRIMARY']
  ds.InstanceCreationDate = _da(study.date)
  ds.InstanceCreationTime = _tm(study.time_s + 3600.0)
  ds.SOPClassUID = SEG_SOP_CLASS_UID
  ds.SOPInstanceUID = sop_uid
  ds.ContentDate = _da(study.date)
  ds.ContentTime = _tm(study.time_s + 3600.0)
  ds.SeriesTime = _tm(study.time_s + 3600.0)
  ds.Modality = 'SEG'
  ds.Manufacturer = 'UCSF'
  ds.SeriesDescription = description
  ds.ManufacturerModelName = 'VOLSER'
  ds.DerivationDescription = (
      f'VOLSER,BACKGROUND={background:.0f},SER PE THRESHOLD=70'
  )
  ref_series = Dataset()
  ref_series.SeriesInstanceUID = source_series_uid
  ref_series.ReferencedInstanceSequence = []
  for k in sorted(source_uids):
    item = Dataset()
    item.ReferencedSOPClassUID = MRImageStorage
    item.ReferencedSOPInstanceUID = source_uids[k]
    ref_series.ReferencedInstanceSequence.append(item)
  ds.ReferencedSeriesSequence = [ref_series]
  ds.DeviceSerialNumber = '0'
  ds.SoftwareVersions = '2.1'
  ds.SeriesInstanceUID = series_uid
  ds.SeriesNumber = series_number
  ds.InstanceNumber = 1
  ds.ContentLabel = 'ANALYSIS_MASK'
  ds.ContentDescription = 'VOLSER analysis mask'
  ds.ContentCreatorName = 'VOLSER^UCSF'
  return ds


def _write_mask(
    path: Path,
    form: str,
    series: _WrittenSeries,
    grid: _Grid,
    codes: np.ndarray,
    background: float,
    *,
    seed: int,
    case: Case,
    phi: dict,
    study: _Study,
    series_key: str,
    series_number: int,
    description: str,
) -> None:
  """One Analysis Mask of ``codes`` (the DCE planes) in ``form`` (:data:`MASK_FORMS`)."""
  ks, slab = _mask_slab(grid, codes)
  ds = _mask_header(
      case,
      phi,
      study,
      series_uid=_uid(seed, case.tcia_id, study.label, series_key),
      sop_uid=_uid(seed, case.tcia_id, study.label, series_key, 'sop'),
      series_number=series_number,
      description=description,
      source_series_uid=series.series_uid,
      source_uids=series.pre_uids,
      background=background,
  )
  if form == 'seg_excluded':
    _set_binary_segments(
        ds, [('excluded', slab != 0)], grid, ks, series.pre_uids
    )
  elif form == 'seg':
    _set_binary_segments(
        ds,
        [(label, (slab & bit) != 0) for bit, label in _SEG_REASONS],
        grid,
        ks,
        series.pre_uids,
    )
  else:
    set_bitflag_mask(
        ds,
        slab,
        np.stack([grid.ipp(k) for k in ks]),
        grid.iop,
        grid.spacing[1:],
        legend=None if form == 'bitflags_no_legend' else MASK_LEGEND,
        orientation_per_frame=form == 'bitflags_per_frame',
        sources=[series.pre_uids.get(k) for k in ks],
    )
  path.parent.mkdir(parents=True, exist_ok=True)
  pydicom.dcmwrite(path, ds, enforce_file_format=True)


def _truncate_in_pixels(path: Path) -> None:
  """Cut a written DICOM file in the middle of its pixel data (the header stays readable)."""
  pixels = pydicom.dcmread(path).get_item(
      'PixelData'
  )  # raw element: offset and length
  with path.open('r+b') as f:
    f.truncate(pixels.value_tell + pixels.length // 2)


# ----------------------------------------------------------------------------- clinical sheets
def write_clinical_sheet(
    path: str | Path,
    rows: Sequence[dict],
    columns: Sequence[str] = CLINICAL_COLUMNS,
) -> Path:
  """Write ``rows`` (dicts keyed by column name; missing keys = empty cells) as an xlsx sheet.

  Header in row 1 (``columns``), one patient per row, cell values as given (int, float, str or
  None for an empty cell).  The cells are deterministic; the file's bytes are not (openpyxl
  stamps the save time into the zip entries and ``docProps/core.xml``).
  """
  import openpyxl

  wb = openpyxl.Workbook()
  ws = wb.active
  ws.title = 'Sheet1'
  ws.append(list(columns))
  for row in rows:
    ws.append([row.get(c) for c in columns])
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  wb.save(path)
  return path


def write_ancillary_sheet(
    path: str | Path, pairs: Sequence[tuple[str, int]]
) -> Path:
  """``Full-Collection-Ancillary-Patient-Information-file.xlsx``: TCIA id -> research id."""
  rows = [
      {ANCILLARY_COLUMNS[0]: tcia, ANCILLARY_COLUMNS[1]: rid}
      for tcia, rid in pairs
  ]
  return write_clinical_sheet(path, rows, ANCILLARY_COLUMNS)


_RACES = (
    'White',
    'Black or African American',
    'Asian',
    'American Indian or Alaska Native',
    'Native Hawaiian or Other Pacific Islander',
)
_ETHNICITY = ('Not Hispanic or Latino', 'Hispanic or Latino')


def _label(value: int | None, kind: str, style: str):
  if value is None:
    return None
  if style == 'int':
    return int(value)
  if style == 'float':
    return float(value)
  if style == 'str_float':
    return f'{float(value):.1f}'
  if kind == 'pcr':
    return 'Yes' if value else 'No'
  return 'Positive' if value else 'Negative'


def _sheet_rows(
    case: Case, truth, rng: np.random.Generator
) -> tuple[list[dict], dict]:
  subtype = schema.SUBTYPES[truth.subtype]
  hr, her2 = int(subtype.startswith('HR+')), int(subtype.endswith('HER2+'))
  age = int(rng.integers(28, 76))
  row = {
      'Patient_ID': (
          case.tcia_id if case.sheet == 'tcia_id' else case.research_id
      ),
      'Arm': truth.arm,
      'HR': _label(hr, 'hr', case.label_style),
      'HER2': _label(her2, 'her2', case.label_style),
      'MP': int(rng.integers(1, 3)),
      'pCR': _label(truth.pcr, 'pcr', case.label_style),
      'Age': age,
      'Race': _RACES[int(rng.integers(len(_RACES)))],
      'Ethnicity': _ETHNICITY[int(rng.integers(2))],
      'Menopausal_Status': 'Post' if age > 52 else 'Pre',
  }
  phi = {'age': age, 'race': row['Race']}
  if case.sheet == 'absent':
    return [], phi
  if case.sheet == 'empty_pcr':
    row['pCR'] = None
    return [row], phi
  if case.sheet == 'duplicate_same':
    return [row, dict(row)], phi
  if case.sheet == 'duplicate_conflict':
    other = dict(row)
    other['pCR'] = _label(1 - truth.pcr, 'pcr', case.label_style)
    return [row, other], phi
  return [row], phi


# ----------------------------------------------------------------------------- one patient
def _study_for(
    case: Case,
    v: int,
    label: str,
    seed: int,
    rng,
    base_date: datetime.date,
    visit_days: float,
    n_study: int,
    token: bool = True,
) -> _Study:
  date = base_date + datetime.timedelta(days=int(visit_days) + n_study * 2)
  token_text = _STUDY_STYLES[case.study_style % len(_STUDY_STYLES)].format(v=v)
  if case.prefix == 'ACRIN-6698':
    token_text = f'ACRIN-6698ISPY2MRIT{v}'
  if not token:  # a study nobody can place
    description, cttp, folder_desc = (
        _NO_TOKEN_DESCRIPTION,
        None,
        _NO_TOKEN_DESCRIPTION,
    )
  elif case.visit_source == 'description':
    description, cttp, folder_desc = token_text, f'T{v}', token_text
  elif case.visit_source == 'cttp':
    description = _NO_TOKEN_DESCRIPTION
    cttp = (f'T{v}', str(v))[v % 2]
    folder_desc = description
  else:  # folder only
    description = None if v == 0 else 'BREAST MRI'
    cttp = None
    folder_desc = f'ISPY2MRIT{v}'
  folder = f'{date:%m-%d-%Y}-{folder_desc}-{int(rng.integers(10000, 99999))}'
  return _Study(
      visit=v,
      label=label,
      description=description,
      cttp=cttp,
      folder=folder,
      date=date,
      time_s=float(rng.uniform(7.5, 17.0)) * 3600.0,
      accession=f'ACC{int(rng.integers(10**7, 10**8))}',
      uid=_uid(seed, case.tcia_id, label, 'study'),
      for_uid=_uid(seed, case.tcia_id, label, 'for'),
  )


def _visit_grid(
    case: Case,
    spec: phantom.PhantomSpec,
    v: int,
    center: np.ndarray,
    axes: np.ndarray,
) -> _Grid:
  """The DCE grid of visit v (a bi-lateral series: this grid's canvas): the phantom's, a real
  series', or the phantom's field of view at the visit's own spacing."""
  if case.size == 'real':
    shape, spacing = REAL_GRIDS['bi' if case.laterality == 'bi' else 'uni']
    return _Grid(shape, spacing, center, axes)
  spacing = dict(case.visit_spacing).get(v)
  if spacing is None:
    return _Grid(
        tuple(spec.shape),
        tuple(float(s) for s in spec.spacing_mm),
        center,
        axes,
    )
  fov = np.asarray(spec.shape) * np.asarray(spec.spacing_mm)
  shape = tuple(int(max(2, round(f / s))) for f, s in zip(fov, spacing))
  return _Grid(shape, tuple(float(s) for s in spacing), center, axes)


def _series_desc(case: Case, lat: str, what: str) -> str:
  lat_text = 'uni-lateral cropped' if lat == 'uni' else 'bi-lateral'
  return f'{case.prefix}: VOLSER: {lat_text}: {what}'


def _series_folder(number: int, description: str, rng) -> str:
  return f'{number}.000000-{description.replace(":", "")}-{int(rng.integers(10000, 99999))}'


def _ser_map(clean: np.ndarray, times: np.ndarray) -> np.ndarray:
  """A derived SER map (x1000, uint16 range) from the noise-free phases."""
  _, e, l = choose_phases(times)
  s0, s1, s2 = clean[0], clean[e], clean[l]
  pe = (s1 - s0) / np.maximum(s0, 1e-3)
  ser = np.where(pe > 0.7, (s1 - s0) / np.maximum(s2 - s0, 1e-3), 0.0)
  return np.clip(ser * 1000.0, 0, 3000)[None]


def _write_patient(
    coll: Path, root: Path, case: Case, spec: phantom.PhantomSpec, seed: int
):
  _, maps, truth = phantom.render_patient_maps(spec, case.phantom_index)
  rng = _rng(seed, case.tcia_id, 'meta')
  axes = _axes(case.orientation)
  side = (
      -1.0 if case.orientation == 'flipped' else 1.0
  )  # flipped: a right breast
  center_pat = np.array(
      [side * rng.uniform(60, 80), rng.uniform(-60, -30), rng.uniform(-40, 40)]
  )
  base_date = datetime.date(2010, 1, 1) + datetime.timedelta(
      days=int(rng.integers(0, 2500))
  )
  birth = base_date - datetime.timedelta(
      days=int(rng.integers(30 * 365, 70 * 365))
  )
  age_years = (base_date - birth).days // 365
  phi = dict(
      birth_date=_da(birth),
      age_str=f'{age_years:03d}Y',
      weight=_ds(round(float(rng.uniform(50, 110)), 1)),
      manufacturer=('GE MEDICAL SYSTEMS', 'SIEMENS', 'Philips Medical Systems')[
          int(rng.integers(3))
      ],
      model=case.layout.model,
      field=('1.5', '3')[int(rng.integers(2))],
      site=f'SITE{int(rng.integers(1, 30)):02d}',
  )
  phi['manufacturer'] = case.layout.manufacturer or phi['manufacturer']
  patient_dir = coll / case.tcia_id

  visits_written = [v for v in case.visits if truth.visit_mask[v]]
  nv = schema.NUM_VISITS
  visit_mask = np.zeros(nv, bool)
  reasons = ['no_study'] * nv
  phase_idx = np.full((nv, schema.NUM_PHASES), -1, np.int64)
  phase_times = np.zeros((nv, schema.NUM_PHASES), np.float32)
  all_times = [None] * nv
  centroid, ftv_centroid, voi_centroid, node_centroid, crop = (
      np.full((nv, 3), np.nan) for _ in range(5)
  )
  volume, ftv_volume = np.zeros(nv), np.zeros(nv)
  mask_source = [None] * nv
  geometry = [None] * nv
  affines = [None] * nv
  dce_desc = [None] * nv
  dce_dirs = [None] * nv
  mask_paths = [None] * nv
  voi_seen = (
      False  # an earlier visit's mask gives the reader a VOI to carry over
  )
  reports = []
  applied = []
  phi_strings = [
      PATIENT_NAME,
      INSTITUTION,
      REFERRING,
      OPERATOR,
      phi['birth_date'],
  ]

  def rel(p: Path) -> str:
    return str(p.relative_to(root))

  extra_studies = []  # (kind, visit)
  for v in visits_written:
    if case.has('duplicate_visit', v):
      extra_studies.append(('duplicate_visit', v))
    if case.has('unknown_study', v):
      extra_studies.append(('unknown_study', v))

  n_study = 0
  for v, kind in [(v, 'main') for v in visits_written] + [
      (v, k) for k, v in extra_studies
  ]:
    label = f'T{v}' if kind == 'main' else f'T{v}-{kind}'
    study = _study_for(
        case,
        v,
        label,
        seed,
        rng,
        base_date,
        truth.visit_days[v],
        n_study,
        token=kind != 'unknown_study',
    )
    n_study += 1
    phi_strings += [study.accession, _da(study.date), f'{study.date:%m-%d-%Y}']
    study_dir = patient_dir / study.folder
    center_v = center_pat + rng.uniform(-5.0, 5.0, 3)
    grid = _visit_grid(case, spec, v, center_v, axes)
    vm = _visit_maps(maps, v)
    if grid.shape != tuple(spec.shape) or grid.spacing != tuple(
        spec.spacing_mm
    ):
      vm = _resample_maps(vm, spec, grid.shape, grid.spacing)
    node = np.zeros(grid.shape, bool)
    if case.node_mm is not None:
      vm, node = _with_node(vm, grid, case.node_mm, truth)
    bilateral = case.laterality == 'bi' or (
        case.laterality == 'both' and v in case.both_visits and kind == 'main'
    )
    tumour = np.isin(
        vm['labels'], (phantom.LABELS['tumour'], phantom.LABELS['necrosis'])
    )
    fov_maps = vm  # the maps of the DCE field of view
    if bilateral:
      canvas = grid.canvas()
      fov_maps = _bilateral_maps(vm)
    del vm
    n_phases = case.num_phases
    if kind == 'duplicate_visit':
      n_phases = max(3, case.num_phases - 2)
    if kind == 'main' and case.has('two_phases', v):
      n_phases = 2
    times = _phase_times(
        _rng(seed, case.tcia_id, label, 'times'), n_phases, case.phase_schedule
    )
    chosen = choose_phases(times)
    if (
        case.size == 'real'
    ):  # one phase at a time, each with its own noise stream
      physics = _Physics(fov_maps, truth, times)
      clean_c = _Phases.lazy(physics, None)
      noisy_c = _Phases.lazy(
          physics,
          lambda p, label=label: _rng(seed, case.tcia_id, label, 'noise', p),
      )
    else:
      clean_c, noisy_c = map(
          _Phases.of,
          _signals(
              fov_maps, truth, times, _rng(seed, case.tcia_id, label, 'noise')
          ),
      )
    clean, noisy = clean_c, noisy_c
    if bilateral:
      clean, noisy = clean_c.last_columns(grid.shape[2]), noisy_c.last_columns(
          grid.shape[2]
      )

    no_dce = kind == 'main' and case.has('no_dce', v)
    write_bi = bilateral and not no_dce
    write_uni = case.laterality != 'bi' and not no_dce
    series = {}
    number = 800
    if write_bi:  # the bilateral series first (lower series numbers)
      desc = _series_desc(case, 'bi', 'original DCE')
      sdir = study_dir / _series_folder(number + 1, desc, rng)
      series['bi'] = (
          canvas,
          _write_mr_series(
              sdir,
              case,
              phi,
              study,
              canvas,
              noisy_c,
              times,
              seed=seed,
              series_key='dce-bi',
              series_number=number + 1,
              description=desc,
              layout=case.layout,
              reverse=case.orientation == 'flipped',
              keep=chosen,
          ),
          desc,
      )
    if write_uni:
      desc = _series_desc(case, 'uni', 'original DCE')
      sdir = study_dir / _series_folder(number + 3, desc, rng)
      skip = set()
      if kind == 'main' and case.has('missing_slice', v):
        p_skip = next(p for p in range(1, n_phases) if p not in chosen)
        skip = {(p_skip, grid.shape[0] // 2)}
        applied.append(('missing_slice', v))
      series['uni'] = (
          grid,
          _write_mr_series(
              sdir,
              case,
              phi,
              study,
              grid,
              noisy,
              times,
              seed=seed,
              series_key='dce-uni',
              series_number=number + 3,
              description=desc,
              layout=case.layout,
              skip=skip,
              reverse=case.orientation == 'flipped',
              keep=chosen,
          ),
          desc,
      )
    derived_kinds = [k for k, dv in case.derived if dv == v and kind == 'main']
    if no_dce and 'SER' not in derived_kinds:
      derived_kinds.append('SER')
    for dk in derived_kinds:
      lat = 'bi' if case.laterality == 'bi' else 'uni'
      desc = _series_desc(case, lat, dk)
      g = canvas if lat == 'bi' else grid
      c = clean_c if lat == 'bi' else clean
      if dk == 'SER':
        vol = _ser_map(c, times)
      else:  # PE2: percentage enhancement of the second post-contrast phase
        vol = np.clip(100.0 * (c[2] - c[0]) / np.maximum(c[0], 1e-3), 0, 1000)[
            None
        ]
      n_der = number + (7 if dk == 'SER' else 8)
      _write_mr_series(
          study_dir / _series_folder(n_der, desc, rng),
          case,
          phi,
          study,
          g,
          vol,
          None,
          seed=seed,
          series_key=f'derived-{dk}',
          series_number=n_der,
          description=desc,
          layout=case.layout._replace(rescale=None),
      )
    if no_dce:
      applied.append(('no_dce', v))

    # Analysis masks: one per written DCE laterality, bilateral first; VOLSER's exclusion bits
    # from the images as written, inside a VOI drawn around the tumour.
    corrupt = kind == 'main' and case.has('corrupt_seg', v)
    no_seg = kind != 'main' or case.has('no_seg', v)
    written_masks = {}  # laterality -> (path, codes of the DCE planes)
    if not no_seg:
      for lat in ('bi', 'uni'):
        if lat not in series:
          continue
        g, ws, _ = series[lat]
        if lat == 'bi':
          tum = np.concatenate([np.zeros_like(tumour), tumour], axis=-1)
        else:
          tum = tumour
        voi = _voi_box(tum, _center_kji(truth, v, spec, g, lat == 'bi'))
        codes, background = volser_codes(
            *(_read_back(ws.stored[p], case.layout.rescale) for p in chosen),
            voi,
        )
        desc = _series_desc(case, lat, 'Analysis Mask')
        n_seg = number + (40 if lat == 'bi' else 41)
        path = study_dir / _series_folder(n_seg, desc, rng) / '1-1.dcm'
        _write_mask(
            path,
            case.mask,
            ws,
            g,
            codes,
            background,
            seed=seed,
            case=case,
            phi=phi,
            study=study,
            series_key=f'seg-{lat}',
            series_number=n_seg,
            description=desc,
        )
        written_masks[lat] = path, codes
      if corrupt:
        for path, _ in written_masks.values():
          _truncate_in_pixels(path)
        applied.append(('corrupt_seg', v))
    elif kind == 'main' and case.has('no_seg', v):
      applied.append(('no_seg', v))

    # Faults on files of the chosen series.
    chosen_lat = (
        'uni' if 'uni' in series else ('bi' if 'bi' in series else None)
    )
    if kind == 'main' and chosen_lat is not None:
      _, ws, _ = series[chosen_lat]
      if case.has('truncated_file', v):
        k, path = ws.files[0][len(ws.files[0]) // 2]
        _truncate_in_pixels(path)
        applied.append(('truncated_file', v))
      if case.has('truncated_last', v):
        _truncate_in_pixels(
            ws.files[-1][-1][1]
        )  # the last written: where a download stops
        applied.append(('truncated_last', v))
      if case.has('junk_file', v):
        (ws.dir / '1-999.dcm').write_bytes(
            b'NBIA Data Retriever manifest fragment - not a DICOM file\r\n' * 8
        )
        applied.append(('junk_file', v))
      if case.has('two_phases', v):
        applied.append(('two_phases', v))

    if kind == 'duplicate_visit':
      reports.append(('duplicate_visit', f'T{v}'))
      applied.append(('duplicate_visit', v))
      continue
    if kind == 'unknown_study':
      reports.append(('unknown_visit', None))
      applied.append(('unknown_study', v))
      continue

    # Truth of the main study of visit v.
    if chosen_lat is None:
      reasons[v] = 'no_dce_series'
      continue
    g, ws, desc = series[chosen_lat]
    affines[v] = _phantom_affine(spec, grid)
    dce_dirs[v] = rel(ws.dir)
    dce_desc[v] = desc
    geometry[v] = g.sitk_geometry()
    if case.has('truncated_file', v) or case.has('truncated_last', v):
      reasons[v] = 'unreadable_dicom'
    elif case.has('missing_slice', v):
      reasons[v] = 'missing_slices'
    elif n_phases < 3:
      reasons[v] = 'missing_phases'
    else:
      reasons[v] = None
      visit_mask[v] = True
      phase_idx[v] = chosen
      phase_times[v] = times[list(chosen)]
      all_times[v] = times.astype(np.float32)
    if not visit_mask[v]:
      continue
    voxel_mm3 = float(np.prod(g.spacing))
    tum = (
        tumour
        if chosen_lat == 'uni'
        else np.concatenate([np.zeros_like(tumour), tumour], -1)
    )
    if tum.any():
      centroid[v] = g.lps(np.argwhere(tum)).mean(0)
      volume[v] = tum.sum() * voxel_mm3
    if node.any():
      node_centroid[v] = g.lps(np.argwhere(node)).mean(0)
    if chosen_lat in written_masks and not corrupt:
      path, codes = written_masks[chosen_lat]
      mask_source[v] = 'analysis_mask_' + (
          'seg' if case.mask.startswith('seg') else 'bitflags'
      )
      mask_paths[v] = rel(path)
      ftv = codes == 0
      # A mask that flags no voxel outside the VOI (one segment 'excluded') has its extent as VOI.
      voi = (
          (codes & VOI_BIT) == 0
          if case.mask != 'seg_excluded'
          else np.ones_like(ftv)
      )
      ftv_volume[v] = ftv.sum() * voxel_mm3
      voi_centroid[v] = g.lps(np.argwhere(voi)).mean(0)
      if ftv.any():
        ftv_centroid[v] = g.lps(np.argwhere(ftv)).mean(0)
      crop[v] = ftv_centroid[v] if ftv.any() else voi_centroid[v]
      voi_seen = True
    else:
      mask_source[v] = 'pe70_in_voi' if voi_seen else 'pe70'
      crop[v] = centroid[v] if tum.any() else crop[0]

  sheet_rows, sheet_phi = _sheet_rows(
      case, truth, _rng(seed, case.tcia_id, 'sheet')
  )
  pcr = None if case.sheet in ('absent', 'empty_pcr') else int(truth.pcr)
  skip = {
      'absent': 'not_in_clinical_sheet',
      'empty_pcr': 'no_pcr_label',
      'duplicate_conflict': 'duplicate_clinical_id',
  }.get(case.sheet)
  phi_strings += [sheet_phi['race']]
  result = PatientTruth(
      case=case,
      tcia_id=case.tcia_id,
      research_id=str(case.research_id),
      phantom_spec=spec,
      phantom_index=case.phantom_index,
      pcr=pcr,
      subtype=int(truth.subtype),
      arm=truth.arm,
      expected_skip=skip,
      visit_mask=visit_mask,
      visit_reasons=tuple(reasons),
      phase_indices=phase_idx,
      phase_times_s=phase_times,
      all_phase_times_s=tuple(all_times),
      tumor_centroid_mm=centroid,
      tumor_volume_mm3=volume,
      ftv_centroid_mm=ftv_centroid,
      ftv_volume_mm3=ftv_volume,
      voi_centroid_mm=voi_centroid,
      node_centroid_mm=node_centroid,
      crop_center_mm=crop,
      phantom_volume_mm3=np.asarray(truth.tumor_volume_mm3, float),
      phantom_to_lps=tuple(affines),
      mask_source=tuple(mask_source),
      dce_geometry=tuple(geometry),
      dce_series_description=tuple(dce_desc),
      dce_dirs=tuple(dce_dirs),
      mask_paths=tuple(mask_paths),
      study_reports=tuple(reports),
      faults_applied=tuple(applied),
      phi=tuple(dict.fromkeys(phi_strings)),
  )
  return result, sheet_rows


def _with_node(
    vm: dict, grid: _Grid, centre_mm, truth
) -> tuple[dict, np.ndarray]:
  """The maps with an enhancing lymph node (a ball of tumour-like kinetics) and its voxels."""
  z, y, x = _phantom_grid_coords(grid)
  zz, yy, xx = np.meshgrid(z, y, x, indexing='ij')
  node = (zz - centre_mm[0]) ** 2 + (yy - centre_mm[1]) ** 2 + (
      xx - centre_mm[2]
  ) ** 2 <= (_NODE_RADIUS_MM**2)
  if np.isin(
      vm['labels'][node], (phantom.LABELS['tumour'], phantom.LABELS['necrosis'])
  ).any():
    raise ValueError(f'node at {centre_mm} mm overlaps the tumour')
  out = {k: a.copy() for k, a in vm.items()}
  out['labels'][node] = phantom.LABELS['muscle']
  out['ktrans_per_min'][node] = 0.5
  out['ve'][node] = 0.4
  out['vp'][node] = 0.05
  out['t10_s'][node] = phantom.T10_S['tumour'] * truth.t10_scale
  return out, node


def _phantom_affine(spec: phantom.PhantomSpec, grid: _Grid) -> np.ndarray:
  """4x4: voxel (k, j, i) of the phantom's own arrays -> LPS mm of this visit's placement."""
  ref = _Grid(
      tuple(spec.shape),
      tuple(float(x) for x in spec.spacing_mm),
      grid.center,
      grid.axes,
  )
  dz, dy, dx = ref.spacing
  out = np.eye(4)
  out[:3, 0] = dz * ref.u_slc
  out[:3, 1] = dy * ref.u_col
  out[:3, 2] = dx * ref.u_row
  out[:3, 3] = ref.origin
  return out


def _center_kji(
    truth, v: int, spec: phantom.PhantomSpec, grid: _Grid, bilateral: bool
) -> np.ndarray:
  """Voxel index (k, j, i) on ``grid`` of the phantom's tumour centre at visit v."""
  c = np.asarray(truth.tumor_center_mm, float) + np.asarray(
      truth.shift_mm[v], float
  )
  d, h, w = grid.shape
  dz, dy, dx = grid.spacing
  w_uni = w // 2 if bilateral else w
  k = c[0] / dz + (d - 1) / 2
  j = c[1] / dy + (h - 1) / 2
  i = c[2] / dx + (w_uni - 1) / 2 + (w - w_uni)
  return np.array([k, j, i])


# ----------------------------------------------------------------------------- the tree
def write_tcia_tree(
    root: str | Path,
    cases: Sequence[Case] = DEFAULT_CASES,
    *,
    seed: int = 0,
    spec: phantom.PhantomSpec = FIXTURE_SPEC,
    collection: str = 'ISPY2',
) -> dict[str, PatientTruth]:
  """Write a TCIA-like I-SPY2 download of ``cases`` under ``root``; returns truth by PatientID.

  Layout: ``root/<collection>/<PatientID>/<study>/<series>/1-NNN.dcm``, the clinical and the
  ancillary xlsx in ``root``, plus non-DICOM clutter (``LICENSE``, ``.DS_Store``).  The DICOM
  bytes and the sheets' cells are a pure function of ``(cases, seed, spec)``.
  """
  root = Path(root)
  ids = [c.tcia_id for c in cases]
  if len(set(ids)) != len(ids):
    raise ValueError('duplicate tcia ids in cases')
  coll = root / collection
  coll.mkdir(parents=True, exist_ok=True)
  truths: dict[str, PatientTruth] = {}
  rows: list[dict] = []
  for case in cases:
    truth, case_rows = _write_patient(coll, root, case, spec, seed)
    truths[case.tcia_id] = truth
    rows.extend(case_rows)
  # Patients in the sheet that were not downloaded.
  extra = _rng(seed, 'extra-rows')
  for n in range(3):
    rid = 199001 + n
    rows.append(
        {
            'Patient_ID': rid,
            'Arm': phantom.ARMS_HER2_NEGATIVE[0],
            'HR': 1,
            'HER2': 0,
            'MP': 1,
            'pCR': int(extra.integers(2)),
            'Age': int(extra.integers(30, 70)),
            'Race': _RACES[0],
            'Ethnicity': _ETHNICITY[0],
            'Menopausal_Status': 'Pre',
        }
    )
  write_clinical_sheet(root / CLINICAL_SHEET_NAME, rows)
  pairs = [(c.tcia_id, c.research_id) for c in cases] + [
      (f'ISPY2-{199001 + n}', 199001 + n) for n in range(3)
  ]
  write_ancillary_sheet(root / ANCILLARY_SHEET_NAME, pairs)
  (root / 'LICENSE').write_text(
      'Creative Commons Attribution 4.0 International (CC BY 4.0) - fixture, not real data.\n'
  )
  (coll / '.DS_Store').write_bytes(b'\x00\x00\x00\x01Bud1' + bytes(range(64)))
  return truths


def main(argv: Sequence[str] | None = None) -> None:
  """``python -m fake_data.tcia_fixtures OUT [--dummy] [--seed N]``: write a tree."""
  import argparse

  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument('out')
  parser.add_argument(
      '--dummy', action='store_true', help='the small DUMMY_CASES tree'
  )
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  truths = write_tcia_tree(
      args.out, DUMMY_CASES if args.dummy else DEFAULT_CASES, seed=args.seed
  )
  for tcia_id, t in truths.items():
    print(
        f'{tcia_id:20s} {t.case.name:15s} visits {t.visit_mask.astype(int)} '
        f'skip {t.expected_skip}'
    )


if __name__ == '__main__':
  main()
