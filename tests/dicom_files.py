"""Writing small DICOM files for the tests (explicit VR little endian), with fake PHI in every
identifying tag so that any test can check that none of it leaks."""

from __future__ import annotations

from collections.abc import Callable
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
                uid: str | None = None, edit: Callable[[FileDataset], None] | None = None, **tags) -> Path:
    """A minimal valid DICOM file with fake PHI in every identifying tag; `pixels` None -> no pixel data;
    `edit(ds)`, when given, runs last, before the file is saved (for what `tags` cannot set)."""
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
    if edit is not None:
        edit(ds)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# -- the whole basic de-identification profile -------------------------------------------------

# Attributes of DICOM PS3.15 Annex E, Table E.1-1 (the Basic Application Level Confidentiality
# Profile; each one checked against the 2024b edition's table) that an MG or US image may carry,
# by keyword; `ProfilePlanter` checks each against pydicom's dictionary. Left out: coded values a
# scan cannot tell from ordinary words (PatientSex "F", PatientSexNeutered, SmokingStatus "YES",
# PregnancyStatus 4), group 0000 command elements (AffectedSOPInstanceUID,
# RequestedSOPInstanceUID), repeating-group overlay and curve elements, the attributes of other
# kinds of object (radiotherapy, clinical trial, specimen, GPS, hanging protocol, structured
# report content), and the profile's other sequences (four are planted, see PROFILE_SEQUENCES).
PS315_BASIC = """
AccessionNumber AcquisitionComments AcquisitionDate AcquisitionDateTime AcquisitionDeviceProcessingDescription
AcquisitionProtocolDescription AcquisitionTime AdditionalPatientHistory AdmissionID AdmittingDate
AdmittingDiagnosesDescription AdmittingTime Allergies BranchOfService CassetteID ConcatenationUID
ConfidentialityConstraintOnPatientDataDescription ConsultingPhysicianName ContentCreatorName ContentDate ContentTime
ContrastBolusAgent ContributionDescription CountryOfResidence CurrentPatientLocation DateOfLastCalibration
DateOfLastDetectorCalibration DateOfSecondaryCapture DerivationDescription DetectorID DeviceSerialNumber DeviceUID
DimensionOrganizationUID DischargeDiagnosisDescription EndAcquisitionDateTime EthnicGroup
FillerOrderNumberImagingServiceRequest FrameComments FrameOfReferenceUID GantryID GeneratorID HumanPerformerName
HumanPerformerOrganization IdentifyingComments ImageComments ImagingServiceRequestComments InstanceCoercionDateTime
InstanceCreationDate InstanceCreationTime InstanceCreatorUID InstitutionAddress InstitutionName
InstitutionalDepartmentName InsurancePlanIdentification IrradiationEventUID IssuerOfAdmissionID IssuerOfPatientID
LastMenstrualDate MediaStorageSOPInstanceUID MedicalAlerts MedicalRecordLocator MilitaryRank
NameOfPhysiciansReadingStudy NamesOfIntendedRecipientsOfResults Occupation OperatorsName
OrderCallbackPhoneNumber OrderEnteredBy OrderEntererLocation OtherPatientIDs OtherPatientNames PatientAddress
PatientAge PatientBirthDate PatientBirthName PatientBirthTime PatientComments
PatientID PatientInstitutionResidence PatientMotherBirthName PatientName PatientReligiousPreference PatientSize
PatientState PatientTelecomInformation PatientTelephoneNumbers PatientTransportArrangements PatientWeight
PerformedLocation PerformedProcedureStepDescription PerformedProcedureStepEndDate PerformedProcedureStepEndTime
PerformedProcedureStepID PerformedProcedureStepStartDate PerformedProcedureStepStartTime PerformedStationAETitle
PerformedStationName PerformingPhysicianName PersonAddress PersonTelephoneNumbers PhysiciansOfRecord
PlacerOrderNumberImagingServiceRequest PlateID PreMedication ProtocolName ReasonForStudy ReferringPhysicianAddress
ReferringPhysicianName ReferringPhysicianTelephoneNumbers RegionOfResidence RequestedContrastAgent
RequestedProcedureComments RequestedProcedureDescription RequestedProcedureID RequestedProcedureLocation
RequestingPhysician RequestingService ResponsibleOrganization ResponsiblePerson ResultsIDIssuer ReviewerName
ScheduledPerformingPhysicianName ScheduledProcedureStepDescription ScheduledProcedureStepEndDate
ScheduledProcedureStepEndTime ScheduledProcedureStepLocation ScheduledProcedureStepStartDate
ScheduledProcedureStepStartTime ScheduledStationAETitle ScheduledStationName ScheduledStudyLocation
ScheduledStudyLocationAETitle SeriesDate SeriesDescription SeriesInstanceUID SeriesTime ServiceEpisodeDescription
ServiceEpisodeID SOPInstanceUID SourceSerialNumber SpecialNeeds StartAcquisitionDateTime StationName
StorageMediaFileSetUID StudyComments StudyDate StudyDescription StudyID StudyIDIssuer StudyInstanceUID StudyTime
SynchronizationFrameOfReferenceUID TextComments TextString TimeOfLastCalibration TimeOfLastDetectorCalibration
TimeOfSecondaryCapture TimezoneOffsetFromUTC TopicAuthor TopicKeywords TopicSubject TopicTitle
VerifyingObserverName VerifyingOrganization VisitComments
AcquisitionFieldOfViewLabel AcquisitionUID CalibrationDateTime DateOfInstallation DateOfManufacture
DateTimeOfLastCalibration DeviceDescription DeviceLabel DischargeDate DischargeTime InterpretationAuthor
InterpretationID InterpretationText IssueDateOfImagingServiceRequest IssueTimeOfImagingServiceRequest
LongDeviceDescription
ModifiedImageDescription NetworkID OrderCallbackTelecomInformation PerformedProcedureStepEndDateTime
PerformedProcedureStepStartDateTime PersonTelecomInformation ReasonForTheImagingServiceRequest
ReasonForTheRequestedProcedure ReasonForVisit ReferencedFrameOfReferenceUID RelatedFrameOfReferenceUID
RequestedSeriesDescription ResultsID RetrieveAETitle ScheduledAdmissionDate ScheduledAdmissionTime
ScheduledProcedureStepID ScheduledStudyStartDate ScheduledStudyStartTime StationAETitle StudyArrivalDate
StudyArrivalTime StudyCompletionDate StudyCompletionTime StudyReadDate StudyReadTime StudyVerifiedDate StudyVerifiedTime
TransactionUID UniqueDeviceIdentifier XRayDetectorID XRayDetectorLabel XRaySourceID
""".split()
# sequences of the profile, planted with an identifying value in an item (a UID or an id)
PROFILE_SEQUENCES = ["OtherPatientIDsSequence", "ReferencedImageSequence", "ReferencedStudySequence",
                     "SourceImageSequence"]
PRIVATE = "private attributes (0029,xx10)"  # the profile removes every private attribute
FIXED = {"PatientAge": "063Y", "PatientSize": "1.73921", "PatientWeight": "71.3849",
         "TimezoneOffsetFromUTC": "+0347"}


class ProfilePlanter:
    """Writes DICOM files (through `write_dicom`) with a value in every attribute of PS315_BASIC,
    PROFILE_SEQUENCES and a private element, and remembers what it planted:
    `planted[attribute]` is the set of values written (UIDs differ per file, PatientID per patient,
    every other value is one per attribute).

    Values are valid for their VR and recognisable: text and names carry the token PHInnnQZ
    (nnn the attribute's index), dates are distinct days of 1901-1944, times HHMMSS.ffffff with
    a distinct fraction, UIDs 2.25.<index><file number>."""

    def __init__(self):
        from collections import defaultdict

        from pydicom.datadict import dictionary_VR, tag_for_keyword

        missing = [k for k in [*PS315_BASIC, *PROFILE_SEQUENCES] if tag_for_keyword(k) is None]
        assert not missing, f"not in pydicom's dictionary: {missing}"
        assert len(set(PS315_BASIC)) == len(PS315_BASIC)
        self.vr = {k: dictionary_VR(tag_for_keyword(k)) for k in PS315_BASIC}
        self.index = {k: i for i, k in enumerate([*PS315_BASIC, *PROFILE_SEQUENCES, PRIVATE])}
        self.planted: dict[str, set[str]] = defaultdict(set)
        self.files = 0

    def token(self, keyword: str) -> str:
        return f"PHI{self.index[keyword]:03d}QZ"

    def _uid(self, keyword: str) -> str:
        return f"2.25.{9000 + self.index[keyword]}{self.files:05d}"

    def _value(self, keyword: str, words: dict[str, str]) -> str:
        import datetime

        i, vr = self.index[keyword], self.vr[keyword]
        day = (datetime.date(1901, 1, 1) + datetime.timedelta(days=97 * i + 3)).strftime("%Y%m%d")
        time = f"{i % 24:02d}{7 * i % 60:02d}{13 * i % 60:02d}.{i:03d}{37 * i % 1000:03d}"
        if keyword in FIXED:
            return FIXED[keyword]
        if keyword in words:  # read by breastfusion for side, view or kind: the words, and a token
            return f"{words[keyword]} {self.token(keyword)}"
        return {"PN": f"{self.token(keyword)}^{self.token(keyword)}G", "DA": day, "TM": time, "DT": day + time,
                "UI": self._uid(keyword)}.get(vr, self.token(keyword))

    def write(self, path: Path, pixels: np.ndarray, *, patient: str, words: dict[str, str] | None = None,
              **kwargs) -> Path:
        """`write_dicom(path, pixels, patient=patient, **kwargs)` with every profile attribute planted;
        `words`: text to put before the token of SeriesDescription, ProtocolName, ..."""
        from pydicom.dataset import Dataset

        self.files += 1
        words = words or {}
        values = {k: self._value(k, words) for k in PS315_BASIC}
        values["PatientID"] = patient
        values["MediaStorageSOPInstanceUID"] = values["SOPInstanceUID"]
        sequences = {}
        for keyword in PROFILE_SEQUENCES:
            item = Dataset()
            if keyword == "OtherPatientIDsSequence":
                item.PatientID, item.TypeOfPatientID = self.token(keyword), "TEXT"
            else:
                item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = MG_SOP, self._uid(keyword)
            sequences[keyword] = [item]
            self.planted[keyword].add(item.PatientID if "PatientID" in item else item.ReferencedSOPInstanceUID)
        for keyword, value in values.items():
            self.planted[keyword].add(self.token(keyword) if keyword in words else value)
        private = self.token(PRIVATE)
        self.planted[PRIVATE].add(private)

        def edit(ds):
            ds.private_block(0x0029, "PHIQZ PRIVATE", create=True).add_new(0x10, "LO", private)

        tags = {k: v for k, v in values.items() if k not in ("PatientID", "MediaStorageSOPInstanceUID",
                                                            "SOPInstanceUID")}
        return write_dicom(path, pixels, patient=patient, uid=values["SOPInstanceUID"], edit=edit,
                           **tags, **sequences, **kwargs)
