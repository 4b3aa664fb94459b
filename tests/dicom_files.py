"""Writing small DICOM files for the tests (explicit VR little endian), with fake PHI in every
identifying tag so that any test can check that none of it leaks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

MG_SOP = "1.2.840.10008.5.1.4.1.1.1.2"
US_SOP = "1.2.840.10008.5.1.4.1.1.6.1"
DBT_SOP = "1.2.840.10008.5.1.4.1.1.13.1.3"

PHI = {
    "PatientName": "Doe^Jane^Secretname",
    "PatientBirthDate": "19580417",
    "InstitutionName": "Hidden Valley Hospital",
    "ReferringPhysicianName": "Who^Doctor^Refname",
    "AccessionNumber": "ACC77889911",
    "OtherPatientIDs": "OTHERID4242",
    "PatientAddress": "12 Confidential Lane",
}
PHI_MARKERS = ["Secretname", "19580417", "Hidden Valley", "Refname", "ACC77889911", "OTHERID4242", "Confidential"]


def write_dicom(path: Path, pixels: np.ndarray | None = None, *, photometric: str = "MONOCHROME2",
                sop_class: str = MG_SOP, patient: str = "PAT-0001", modality: str = "MG",
                uid: str | None = None, **tags) -> Path:
    """A minimal valid DICOM file with fake PHI in every identifying tag; `pixels` None -> no pixel data."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = uid or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality, ds.StudyInstanceUID = patient, modality, "1.2.3.4"
    for key, value in PHI.items():
        setattr(ds, key, value)
    if pixels is not None:
        arr = np.ascontiguousarray(pixels)
        colour = photometric == "RGB"
        ds.SamplesPerPixel = 3 if colour else 1
        if colour:
            ds.PlanarConfiguration = 0
        ds.PhotometricInterpretation = photometric
        ds.Rows, ds.Columns = arr.shape[-3:-1] if colour else arr.shape[-2:]
        ds.BitsAllocated = arr.dtype.itemsize * 8
        ds.BitsStored = tags.pop("BitsStored", ds.BitsAllocated)
        ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
        ds.PixelData = arr.tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
