"""Sources: fetch studies from a PACS (C-FIND + C-MOVE/C-GET, or QIDO-RS + WADO-RS) into the node's
ingest, and the fetch requests (`dxnode fetch`, POST /api/requests, orders) that drive it."""
