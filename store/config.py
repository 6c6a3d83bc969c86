"""Frozen, validated configuration objects shared by every part of sclstore.

They live on the ground floor (``sclstore.store``) so that ingest, query and eval can use them
without importing upward; the facade re-exports them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from .errors import InvalidInputError

__all__ = [
    "DEVICES",
    "DTYPES",
    "NUMERICS",
    "PINNED",
    "POOLS",
    "ArraySpec",
    "Device",
    "Dtype",
    "IngestConfig",
    "Pool",
    "StoreSettings",
    "fields_marked",
    "parse_csv",
    "parse_layers",
    "parse_model_options",
    "validate_name",
]

Dtype = Literal["float32", "float16"]
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
"""Inference precision: ``auto`` = each family's official inference precision on CUDA and fp32 on
the CPU; otherwise that precision everywhere (bf16/fp16 as autocast)."""
Precision = Literal["auto", "fp32", "bf16", "fp16"]
DTYPES: tuple[str, ...] = get_args(Dtype)
Device = Literal["auto", "cpu", "cuda"]
DEVICES: tuple[str, ...] = get_args(Device)
Pool = str  # "cls", "mean", "max", and model-specific ones such as "T", "S", "official"
POOLS: tuple[str, ...] = ("cls", "mean", "max")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def validate_name(value: str, *, what: str) -> str:
    """Check a user-supplied name (dataset, model, pool) and return it.

    Names are 1-128 characters of letters, digits, ``.``, ``_`` and ``-``, starting with a
    letter or digit, so they are safe in paths, URIs and log lines.

    Raises
    ------
    InvalidInputError
        If the name has other characters.
    """
    if not isinstance(value, str) or not _NAME_RE.match(value):
        msg = (
            f"invalid {what} name {value!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
        raise InvalidInputError(msg)
    return value


def parse_csv(text: str | None) -> tuple[str, ...]:
    """Split ``"a,b , c"`` into ``("a", "b", "c")``; ``None`` or ``""`` give ``()``."""
    if not text:
        return ()
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_layers(spec: str | tuple[int, ...] | list[int] | None, n_layers: int) -> tuple[int, ...]:
    """Resolve a layer selection against a model with layers ``0..n_layers``.

    Parameters
    ----------
    spec
        ``None`` or ``"all"`` for every layer, ``"0,6,12"`` for a list, ``"0:12"`` for an
        inclusive range, or a sequence of ints.
    n_layers
        Number of transformer blocks ``L``; valid layers are ``0`` (input to block 0) to ``L``.

    Returns
    -------
    tuple of int
        Sorted, unique layer numbers.

    Raises
    ------
    InvalidInputError
        If the text does not parse or a layer is out of range.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all")):
        return tuple(range(n_layers + 1))
    layers: list[int] = []
    try:
        if isinstance(spec, str):
            for part in parse_csv(spec):
                if ":" in part:
                    lo, hi = (int(x) for x in part.split(":", 1))
                    layers.extend(range(lo, hi + 1))
                else:
                    layers.append(int(part))
        else:
            layers = [int(x) for x in spec]
    except ValueError:
        msg = f"cannot parse --layers {spec!r}: use 'all', a list like '0,6,12' or a range like '0:12'"
        raise InvalidInputError(msg) from None
    bad = [x for x in layers if x < 0 or x > n_layers]
    if bad or not layers:
        msg = (
            f"layers {bad or spec!r} out of range: this model has layers 0..{n_layers} "
            f"(0 = embedding output, 1..{n_layers} = blocks); pass --layers within that range"
        )
        raise InvalidInputError(msg)
    return tuple(sorted(set(layers)))


@dataclass(frozen=True, kw_only=True)
class ArraySpec:
    """Physical description of one run's TileDB array."""

    n_layers: int
    """Number of stored layer slots (the kept layers, in order)."""
    n_cells: int
    dim: int
    pools: tuple[str, ...]
    dtype: Dtype = "float32"

    def __post_init__(self) -> None:
        if self.n_layers < 1 or self.n_cells < 1 or self.dim < 1:
            msg = f"array shape must be positive, got layers={self.n_layers} cells={self.n_cells} dim={self.dim}"
            raise InvalidInputError(msg)
        if not self.pools:
            raise InvalidInputError("at least one pool is needed, e.g. --pool cls,mean")
        for pool in self.pools:
            validate_name(pool, what="pool")
        if len(set(self.pools)) != len(self.pools):
            raise InvalidInputError(f"pools repeat: {self.pools}")
        if self.dtype not in DTYPES:
            raise InvalidInputError(f"dtype {self.dtype!r} is not one of {DTYPES}")


NUMERICS = "numerics"
"""Field-metadata flag: the field can change the stored numbers, so it enters the run's cache key."""
PINNED = "pinned"
"""Field-metadata flag: the field shapes how a run is computed; a resumed run keeps its first value."""


def _numerics(**kw: Any) -> Any:
    return field(metadata={NUMERICS: True}, **kw)


def _pinned(**kw: Any) -> Any:
    return field(metadata={PINNED: True}, **kw)


def fields_marked(cls: type, flag: str) -> tuple[str, ...]:
    """Names of the dataclass fields of ``cls`` whose metadata sets ``flag`` (in field order)."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get(flag))


@dataclass(frozen=True, kw_only=True)
class IngestConfig:
    """Everything ``sclstore ingest`` needs besides the data file.

    Fields marked ``numerics`` in their metadata (model, checkpoint, pools, layers, dtype,
    counts_layer, gene_column, seed, max_genes, precision, model_options) can change the stored numbers;
    the run's cache key is derived from all of them (:mod:`sclstore.ingest.run_key`), so a new
    such field enters the key by being marked. ``device`` enters through the precision it
    implies. Fields marked ``pinned`` (batch_size, chunk_cells) are kept from the run's first
    attempt when it resumes; the others (name, cluster_by, workers, memory_mb, shard_cells, progress,
    wait, rehash) never change a number.
    """

    model: str = _numerics()
    checkpoint: str | None = _numerics(default=None)
    name: str | None = None
    pools: tuple[str, ...] | None = _numerics(default=None)
    layers: str | tuple[int, ...] | None = _numerics(default=None)
    dtype: Dtype = _numerics(default="float32")  # noqa: RUF009 (a dataclasses.field factory)
    batch_size: int = _pinned(default=32)
    device: Device = "auto"
    counts_layer: str | None = _numerics(default=None)
    gene_column: str | None = _numerics(default=None)
    cluster_by: tuple[str, ...] = ()
    seed: int = _numerics(default=0)
    max_genes: int | None = _numerics(default=None)
    precision: Precision = _numerics(default="auto")  # noqa: RUF009 (a dataclasses.field factory)
    """``auto`` (the family's official inference precision on CUDA, fp32 on the CPU), ``fp32``,
    ``bf16`` or ``fp16`` (autocast)."""
    model_options: tuple[tuple[str, str], ...] = _numerics(default=())
    """Model-specific options as ``(key, value)`` pairs (a dict is accepted), e.g. scFoundation's
    ``(("sub_model", "rde"),)``; the adapter validates the keys and hashes them with the checkpoint."""
    chunk_cells: int | None = _pinned(default=None)
    """Cells per durable write (the resume points); default: as many as fit :attr:`memory_mb`, at most 4,096."""
    memory_mb: int = 256
    """Host memory for embeddings in flight (about three chunks of every kept layer and pool)."""
    shard_cells: int | None = None
    """Cells per shard (rounded up to chunk and tile boundaries); default: one shard for a plain
    ingest, about four per worker with ``devices``, 16 chunks for ``submit``."""
    workers: int = 1
    progress: bool = True
    wait: bool = True
    rehash: bool = False
    """Recompute the data's and the checkpoint's content hashes instead of using the digest cache."""

    def __post_init__(self) -> None:
        if self.name is not None:
            validate_name(self.name, what="dataset")
        if self.dtype not in DTYPES:
            raise InvalidInputError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.device not in DEVICES:
            raise InvalidInputError(f"--device {self.device!r} is not one of {', '.join(DEVICES)}")
        if self.precision not in PRECISIONS:
            raise InvalidInputError(f"--precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.batch_size < 1:
            raise InvalidInputError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.chunk_cells is not None and self.chunk_cells < 1:
            raise InvalidInputError(f"--chunk-cells must be >= 1, got {self.chunk_cells}")
        if self.shard_cells is not None and self.shard_cells < 1:
            raise InvalidInputError(f"--shard-cells must be >= 1, got {self.shard_cells}")
        if self.memory_mb < 1:
            raise InvalidInputError(f"--memory-mb must be >= 1, got {self.memory_mb}")
        if self.max_genes is not None and self.max_genes < 2:
            raise InvalidInputError(f"max_genes must be >= 2, got {self.max_genes}")
        if self.workers < 0:
            raise InvalidInputError(f"workers must be >= 0, got {self.workers}")
        if self.pools is not None:
            for pool in self.pools:
                validate_name(pool, what="pool")
        object.__setattr__(self, "model_options", parse_model_options(self.model_options))


_OPTION_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_OPTION_VALUE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def parse_model_options(options: Any) -> tuple[tuple[str, str], ...]:
    """Normalise model options to sorted ``(key, value)`` pairs.

    Accepts a mapping, ``(key, value)`` pairs or ``"key=value"`` strings (the CLI's
    ``--model-option``).

    Raises
    ------
    InvalidInputError
        For a malformed or repeated key, or a value with characters other than letters, digits, ``._-``.
    """
    items = options.items() if isinstance(options, Mapping) else options
    pairs: dict[str, str] = {}
    for item in items or ():
        if isinstance(item, str):
            key, sep, value = item.partition("=")
            if not sep:
                raise InvalidInputError(f"model option {item!r} is not KEY=VALUE, e.g. --model-option sub_model=rde")
        else:
            key, value = item
        key, value = str(key).strip(), str(value).strip()
        if not _OPTION_KEY.match(key) or not _OPTION_VALUE.match(value):
            msg = f"model option {key}={value!r} is malformed: KEY is an identifier, VALUE letters, digits, '.', '_' or '-'"
            raise InvalidInputError(msg)
        if key in pairs and pairs[key] != value:
            raise InvalidInputError(f"model option {key!r} given twice ({pairs[key]!r} and {value!r}): keep one")
        pairs[key] = value
    return tuple(sorted(pairs.items()))


@dataclass(frozen=True, kw_only=True)
class StoreSettings:
    """Process-level knobs of an open store."""

    lease_ttl_s: float = 60.0
    """A run whose lease heartbeat is older than this may be taken over."""
    heartbeat_s: float = 5.0
    memory_budget_bytes: int = 4 * 1024**3
    """Largest query result materialised in memory."""
    tiledb_config: dict[str, str] = field(default_factory=dict)
    direct_reads: bool = True
    """Read complete runs straight from their tile files when their layout qualifies (mapped
    locally, by ranged VFS reads on object storage: :mod:`sclstore.store.direct`); ``False``
    reads everything through libtiledb."""
    remote_consolidate_max_bytes: int = 2 * 1024**3
    """On object storage, a completed run's array up to this size is rewritten as one fragment;
    a larger one keeps its (disjoint) fragments and only their metadata is consolidated."""

    def __post_init__(self) -> None:
        if self.heartbeat_s <= 0 or self.lease_ttl_s <= self.heartbeat_s:
            msg = f"lease_ttl_s ({self.lease_ttl_s}) must exceed heartbeat_s ({self.heartbeat_s}) > 0"
            raise InvalidInputError(msg)
        if self.memory_budget_bytes <= 0:
            raise InvalidInputError("memory_budget_bytes must be positive")
