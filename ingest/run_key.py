"""The run's cache key, derived from the configuration rather than listed by hand.

``key = sha256(canonical JSON of)``

* every :class:`~sclstore.store.config.IngestConfig` field marked ``numerics`` in its metadata,
  each at its *resolved* value where the pipeline resolves it (``layers="all"`` -> ``[0..L]``,
  the default pools, the checkpoint's content hash instead of its path, the adapter's family,
  the counts element actually read); a marked field without a resolver enters as given;
* the dataset's content hash and the checkpoint hash;
* a digest of the gene -> token mapping (which columns, which tokens: ``--gene-column`` and
  the vocabulary both show here);
* a digest of what the adapter derives from its checkpoint and options (``describe()``,
  without the display name), and the precision the device implies;
* the array encoding version and :data:`KEY_VERSION`.

Adding a field that changes the numbers to ``IngestConfig`` and marking it is all it takes
for the key to cover it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from sclstore.store import IngestConfig, RunInfo, cache_key
from sclstore.store.arrays import ENCODING_VERSION
from sclstore.store.config import NUMERICS, PINNED, fields_marked
from sclstore.store.errors import ModelError

from .adapter import GeneMapping

__all__ = ["KEY_VERSION", "RunKey", "adapter_digest", "mapping_digest", "pin_resumed", "pinned_values", "run_key"]

logger = logging.getLogger(__name__)

KEY_VERSION = 2
"""Version of the key's recipe; bump when the recipe changes."""


@dataclass(frozen=True)
class RunKey:
    """A run's cache key and the values it was derived from (stored as the run's params)."""

    key: str
    params: dict[str, Any]


def mapping_digest(mapping: GeneMapping) -> str:
    """sha256 of the mapping's column positions, token ids and number of columns."""
    h = hashlib.sha256(f"{mapping.n_vars}\0".encode())
    h.update(np.ascontiguousarray(mapping.var_index, dtype=np.int64).tobytes())
    h.update(b"\0")
    h.update(np.ascontiguousarray(mapping.token_ids, dtype=np.int64).tobytes())
    return h.hexdigest()


def adapter_digest(description: Mapping[str, Any]) -> str:
    """sha256 of an adapter's ``describe()`` without its display ``name``."""
    body = {k: v for k, v in description.items() if k != "name"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def run_key(
    config: IngestConfig, *, resolved: Mapping[str, Any], content_hash: str, checkpoint_hash: str,
    mapping: GeneMapping, adapter_description: Mapping[str, Any], precision: str,
    storage: Mapping[str, Any] | None = None,
) -> RunKey:
    """Derive the cache key of a run (see the module docstring).

    Parameters
    ----------
    config
        The ingest configuration.
    resolved
        Resolved values of marked fields, by field name.
    content_hash, checkpoint_hash
        Dataset and checkpoint hashes.
    mapping
        The gene mapping the run tokenizes with.
    adapter_description
        ``adapter.describe()``.
    precision
        The resolved inference precision (``fp32``, ``bf16`` or ``fp16``).
    storage
        How the counts are stored, for tokenizers whose output depends on it (dense vs sparse
        X and its dtype, a fingerprint of non-canonical stored entries); empty otherwise.

    Returns
    -------
    RunKey

    Raises
    ------
    ModelError
        If ``resolved`` names a field that is not marked ``numerics`` (a programming error).
    """
    marked = fields_marked(IngestConfig, NUMERICS)
    stray = sorted(set(resolved) - set(marked))
    if stray:
        raise ModelError(f"resolved values given for fields not marked numerics: {stray}")
    values = {name: _jsonable(resolved[name] if name in resolved else getattr(config, name)) for name in marked}
    derived = {"gene_mapping": mapping_digest(mapping), "adapter": adapter_digest(adapter_description), "precision": precision,
               **{k: _jsonable(v) for k, v in sorted((storage or {}).items())}}
    key = cache_key({"key_version": KEY_VERSION, "encoding_version": ENCODING_VERSION, "dataset": content_hash,
                     "checkpoint": checkpoint_hash, "config": values, "derived": derived})
    params = {**values, **derived, **pinned_values(config), "key_version": KEY_VERSION}
    return RunKey(key=key, params=params)


def pinned_values(config: IngestConfig) -> dict[str, Any]:
    """The ``pinned`` fields of ``config`` (kept from a run's first attempt when it resumes)."""
    return {name: getattr(config, name) for name in fields_marked(IngestConfig, PINNED)}


def pin_resumed(run: RunInfo, config: IngestConfig, start: int) -> dict[str, Any]:
    """The pinned values a run continues with: its first attempt's, when it resumes.

    Batch composition changes the last bits of a forward pass and chunk boundaries are the
    resume points, so a run resumed with another ``batch_size`` or ``chunk_cells`` keeps those
    of its first attempt (logged), and ends bit-identical to an uninterrupted run.
    """
    given = pinned_values(config)
    if start == 0:
        return given
    out = dict(given)
    for name, value in given.items():
        first = run.params.get(name)
        if first is not None and first != value:
            logger.warning("run %s resumes at cell %d with %s=%s, as it started (not %s), so its numbers do not change mid-run",
                           run.id, start, name, first, value)
            out[name] = first
    return out
