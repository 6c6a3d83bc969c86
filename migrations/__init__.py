"""Alembic migrations of the sclstore catalog (shipped in the wheel)."""
