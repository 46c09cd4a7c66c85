"""dxnode: a DICOM AI node."""

__version__ = "0.1.0"
