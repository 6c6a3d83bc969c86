"""The one error hierarchy of sclstore.

Every error a user can cause derives from :class:`SclstoreError`. Messages are one line that
names the problem and says what to do. Backend exceptions (TileDB, SQLAlchemy) are translated
into these classes once, at the boundary in :mod:`sclstore.store`, by exception type.
"""

from __future__ import annotations

__all__ = [
    "ArrayError",
    "CatalogBusyError",
    "CatalogConnectionError",
    "CatalogDamagedError",
    "CheckpointError",
    "DatasetError",
    "DuplicateObsNamesError",
    "EncodingVersionError",
    "EvaluationError",
    "IngestError",
    "InvalidInputError",
    "InvalidQueryError",
    "LeaseHeldError",
    "ModelError",
    "NotFoundError",
    "OutputError",
    "QueryTooLargeError",
    "ReadOnlyStoreError",
    "RunNotFoundError",
    "SchemaVersionError",
    "SclstoreError",
    "StoreExistsError",
    "StoreNotFoundError",
]


class SclstoreError(Exception):
    """Base class of every error raised by sclstore on purpose."""


class StoreNotFoundError(SclstoreError, FileNotFoundError):
    """The path is not an sclstore store (or does not exist)."""


class StoreExistsError(SclstoreError):
    """A store already exists where a new one was asked for."""


class CatalogConnectionError(SclstoreError, ConnectionError):
    """The catalog database cannot be reached or refused the credentials."""


class CatalogBusyError(CatalogConnectionError):
    """The SQLite catalog stayed locked by another process for longer than the busy timeout."""


class ReadOnlyStoreError(SclstoreError, PermissionError):
    """A command would write to a store this user can only read."""


class CatalogDamagedError(SclstoreError):
    """The catalog lacks a table or column it should hold (e.g. a dataset's obs table was dropped)."""


class SchemaVersionError(SclstoreError):
    """The catalog schema is older or newer than this version of sclstore expects."""


class InvalidInputError(SclstoreError, ValueError):
    """An argument or input file is not valid."""


class OutputError(InvalidInputError, OSError):
    """An output file cannot be written (exists, is a folder, disk full, no permission)."""


class DatasetError(InvalidInputError):
    """A dataset cannot be registered as given."""


class DuplicateObsNamesError(DatasetError):
    """Cell (obs) names are not unique."""


class NotFoundError(SclstoreError, KeyError):
    """A named object (dataset, model, run, pool, layer) does not exist in the store."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class RunNotFoundError(NotFoundError):
    """No run matches the given id or name."""


class LeaseHeldError(SclstoreError):
    """Another live process holds the lease on a run."""


class ArrayError(SclstoreError):
    """A TileDB array is missing, unreadable or inconsistent with the catalog."""


class EncodingVersionError(ArrayError):
    """An array was written with an encoding this version of sclstore cannot read."""


class ModelError(SclstoreError):
    """A model family, adapter or configuration problem."""


class CheckpointError(ModelError):
    """A checkpoint folder or file is missing, malformed or does not match the model."""


class IngestError(SclstoreError):
    """Ingest failed for a reason other than bad input (e.g. the run was failed earlier)."""


class InvalidQueryError(SclstoreError, ValueError):
    """A slice query is not valid or not allowed."""


class QueryTooLargeError(InvalidQueryError):
    """A query result would exceed the memory budget."""


class EvaluationError(SclstoreError, ValueError):
    """An evaluation cannot run with the given data or parameters."""
