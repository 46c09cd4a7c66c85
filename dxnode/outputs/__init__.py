"""Stage 5, outputs: results written as DICOM objects for the PACS (SR, Secondary Capture), with
UIDs derived from the result."""
