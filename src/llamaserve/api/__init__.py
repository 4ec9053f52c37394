"""The HTTP API: FastAPI app factory and routers."""
