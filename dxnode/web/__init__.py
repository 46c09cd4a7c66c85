"""The admin and user surface: REST API, server-rendered pages and metrics (FastAPI)."""
