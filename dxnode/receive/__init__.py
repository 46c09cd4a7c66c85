"""Stage 1, receive: a DICOM instance from the network made durable and recorded, whatever carried it.

``ingest`` is the one way in (parse, bounds, spool, rows); the C-STORE listener (dxnode/scp.py) and
STOW-RS (dxnode/web/stow.py) both call it."""
