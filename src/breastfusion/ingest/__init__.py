"""Bringing archives in: pixel reading, DICOM tag interpretation and folder ingestion.

- `ingest.pixels`: one reader for DICOM and image files (PNG, JPEG, PGM...),
  giving a 2D float32 array in [0, 1] (`read_pixels`) or the colour image of a
  colour file (`read_rgb`); every failure is an `InputImageError` of one line.
- `ingest.dicom`: what a DICOM header says about an image (modality, side,
  view, 2D or synthesized 2D, reasons to reject it), from tags only.
- `ingest.folder`: walks a folder into manifest records (`ingest_folder`) and
  writes them with the list of skipped files (`write_ingest`).
"""
