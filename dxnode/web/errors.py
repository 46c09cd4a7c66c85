"""The error answers every REST route may give, documented once for the OpenAPI document."""

from __future__ import annotations

from typing import Any

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "Malformed request (e.g. a broken multipart body)"},
    401: {"description": "Missing or invalid token"},
    403: {"description": "Needs an admin token"},
    404: {"description": "Not found"},
    422: {"description": "Invalid parameters"},
    429: {"description": "Too many wrong tokens from this address (see Retry-After)"},
}
