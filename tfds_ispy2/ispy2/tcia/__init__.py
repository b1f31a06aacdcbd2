"""Reader of a TCIA or IDC download of I-SPY2 DCE-MRI into the examples of the `ispy2/tcia` config.

Pure functions (no TFDS, no JAX) so that the builder can run them in worker processes or Beam. One
module per stage, in the order a build runs them:

* `discovery`: every DICOM file under ``manual_dir`` grouped by its headers into patients and
  visits (T0..T3), and per visit the DCE series and the Analysis Mask (SEG SOP class);
* `clinical_sheet`: the labels, from the clinical sheet (and the ancillary id mapping);
* `slices`: one DCE series' slice headers, its phases, and the three phases used as volumes;
* `grids`: resampling by geometry onto the axis-aligned LPS grid of the record;
* `analysis_mask`: the radiologist's VOI and I-SPY's FTV, in either form of the mask;
* `pe70`: the tumour of a visit without a usable mask (PE >= 70 %);
* `patient`: one patient into an example of ``schema.features``: pre/early/late phases and, per
  visit, the FTV inside the VOI, cropped around the tumour (the VOI when the FTV is empty), with
  metadata that says where the CPU time went (`StageTimer`);

and beside them `headers` (one header's values, read once: `dicom_scan`'s walk, else pydicom) and
`errors` (the reason codes every stage raises). The grid and the crop in voxels are
`tfds_ispy2.ispy2.geometry`'s, shared with pcrjax.

The conventions (visit tokens, series choice, phase choice, geometry, inverse analysis mask,
PE >= 70 % fallback, clinical columns) are those of the shared `ispy2/tcia` contract. Privacy: no
DICOM header text except the TCIA PatientID (de-identified by TCIA) reaches an example, an
`Issue`, a `Skip` or the metadata (only numbers and defined terms such as BitsAllocated or
SegmentationType); file names in messages have dates masked.

This package's names below are the reader's interface, for the builder, the download command and
`pcrjax`'s prediction of new patients.
"""

from tfds_ispy2.ispy2.tcia.analysis_mask import (
    DOCUMENTED_BITS,
    MASK_LEGEND_TAG,
    AnalysisMask,
    MaskError,
    mask_codes,
    read_analysis_mask,
)
from tfds_ispy2.ispy2.tcia.clinical_sheet import (
    ANCILLARY_FILE,
    CLINICAL_FILE,
    ClinicalRecord,
    read_clinical,
)
from tfds_ispy2.ispy2.tcia.discovery import (
    LAYOUT,
    SEG_SOP_CLASS,
    FileHeader,
    PatientFiles,
    Series,
    VisitFiles,
    discover,
    is_dce,
    is_mask,
    laterality,
    scan_file,
    study_visit,
)
from tfds_ispy2.ispy2.tcia.errors import Issue, Skip, VisitError
from tfds_ispy2.ispy2.tcia.grids import resample, resample_crop, target_grid
from tfds_ispy2.ispy2.tcia.patient import (
    MASK_SOURCES,
    StageTimer,
    TciaSpec,
    process_patient,
    read_images,
)
from tfds_ispy2.ispy2.tcia.pe70 import pe70_mask
from tfds_ispy2.ispy2.tcia.slices import (
    PixelRef,
    SliceHeader,
    check_phases,
    choose_phases,
    load_volume,
    phase_times,
    read_slice_header,
    sort_slices,
    split_phases,
)

__all__ = [
    'TciaSpec',
    'Skip',
    'VisitError',
    'Issue',
    'VisitFiles',
    'PatientFiles',
    'ClinicalRecord',
    'FileHeader',
    'Series',
    'SliceHeader',
    'PixelRef',
    'MaskError',
    'AnalysisMask',
    'StageTimer',
    'discover',
    'scan_file',
    'study_visit',
    'laterality',
    'is_dce',
    'is_mask',
    'read_clinical',
    'process_patient',
    'read_images',
    'read_slice_header',
    'split_phases',
    'phase_times',
    'choose_phases',
    'sort_slices',
    'check_phases',
    'load_volume',
    'target_grid',
    'resample',
    'resample_crop',
    'read_analysis_mask',
    'mask_codes',
    'pe70_mask',
    'CLINICAL_FILE',
    'ANCILLARY_FILE',
    'LAYOUT',
    'MASK_SOURCES',
    'MASK_LEGEND_TAG',
    'DOCUMENTED_BITS',
    'SEG_SOP_CLASS',
]
