"""The model-adapter protocol: what the ingest pipeline needs from any single-cell model.

An adapter owns one checkpoint. Constructing it reads only small files (configs, vocabulary);
:meth:`ModelAdapter.load` builds the network and loads the weights. The pipeline then calls,
in order:

1. :meth:`ModelAdapter.map_genes` on the dataset's gene ids -> a :class:`GeneMapping`; this also
   binds :attr:`ModelAdapter.tokenizer` to that mapping;
2. ``adapter.tokenizer.tokenize(X[rows][:, mapping.var_index], cell_idx, seed=seed)`` in worker
   processes (the tokenizer is picklable and holds no weights) -> one record per cell;
3. :meth:`ModelAdapter.collate` on a list of records -> a padded :class:`TokenBatch`;
4. :meth:`ModelAdapter.embed` -> ``{pool: (n_layers_kept, B, d) float32}``.

Layer numbering: ``0`` is the input of block 0 (the embedding-layer output); ``l`` is the output
of block ``l`` (1-based), so a model with ``L`` blocks has stored layers ``0..L``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar, cast, runtime_checkable

import numpy as np
import scipy.sparse
import torch
from torch import nn

from sclstore.store.errors import InvalidInputError, ModelError
from sclstore.store.hashcache import cached_digest

from .capture import LayerCapture, PoolingInfo

__all__ = [
    "Batch",
    "GeneMapping",
    "ModelAdapter",
    "OfficialEmbedding",
    "TokenBatch",
    "TokenRecord",
    "Tokenizer",
    "autocast_for",
    "cell_generator",
    "hash_files",
    "looks_like_ensembl",
    "map_to_vocab",
    "official_from_stored",
    "resolve_precision",
]

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=nn.Module)

_ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
_VERSION_RE = re.compile(r"\.\d+$")


@dataclass(frozen=True)
class GeneMapping:
    """Which dataset genes a model knows, and their token ids.

    Attributes
    ----------
    var_index
        int64 positions (in ``adata.var`` order, increasing) of the genes found in the vocabulary.
    token_ids
        int64 token id of each of those genes.
    n_vars
        Number of genes in the dataset.
    """

    var_index: np.ndarray
    token_ids: np.ndarray
    n_vars: int

    def __post_init__(self) -> None:
        if self.var_index.shape != self.token_ids.shape or self.var_index.ndim != 1:
            msg = f"var_index {self.var_index.shape} and token_ids {self.token_ids.shape} must be equal 1-d"
            raise ModelError(msg)

    @property
    def n_matched(self) -> int:
        """Number of dataset genes found in the vocabulary."""
        return int(self.var_index.shape[0])

    def stats(self) -> dict[str, float | int]:
        """Return JSON-able mapping statistics (``n_vars``, ``n_matched``, ``matched_fraction``)."""
        frac = self.n_matched / self.n_vars if self.n_vars else 0.0
        return {"n_vars": int(self.n_vars), "n_matched": self.n_matched, "matched_fraction": round(frac, 6)}


@dataclass(frozen=True)
class TokenRecord:
    """The tokens of one cell, ready to be collated (picklable, numpy only).

    Attributes
    ----------
    cell_idx
        Global index of the cell in the dataset.
    gene_ids
        int64 token ids, special tokens included.
    values
        float32 input value of each token.
    embeddable
        False when the model cannot embed the cell (no gene token; the official tokenizer
        would drop it): the pipeline stores NaN for it and records it in the run.
    """

    cell_idx: int
    gene_ids: np.ndarray
    values: np.ndarray
    embeddable: bool = True

    def __len__(self) -> int:
        return int(self.gene_ids.shape[0])


@runtime_checkable
class Tokenizer(Protocol):
    """Turns raw counts into per-cell token records; picklable, holds no weights.

    A tokenizer that needs each cell's total count over all genes (Geneformer) sets
    ``needs_cell_totals = True`` and provides ``cell_totals(full_counts, obs_rows)``; the pipeline
    then passes ``totals=`` to :meth:`tokenize`.
    """

    def tokenize(self, counts: scipy.sparse.csr_matrix, cell_idx: np.ndarray, *, seed: int) -> list[Any]:
        """Tokenize the rows of ``counts`` (columns = the mapping's genes, in mapping order)."""
        ...

    def seq_len(self, record: Any) -> int:
        """Number of tokens of a record (for length-bucketed batching)."""
        ...


class Batch(Protocol):
    """A collated batch: tensors plus what the hooks need to pool."""

    @property
    def size(self) -> int:
        """Number of cells."""
        ...

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> Batch:
        """Copy to a device."""
        ...

    def pooling_info(self) -> PoolingInfo:
        """Gene-token mask and pooling positions."""
        ...


@dataclass(frozen=True)
class TokenBatch:
    """A padded batch of token records.

    Attributes
    ----------
    gene_ids
        ``(B, S)`` int64 token ids, padded with the pad token.
    values
        ``(B, S)`` float32 input values, padded with the pad value.
    padding_mask
        ``(B, S)`` bool, True at real tokens (attend), False at padding.
    gene_mask
        ``(B, S)`` bool, True at gene tokens (real and not special).
    positions
        Position pools, name -> ``(B,)`` int64 index.
    cell_idx
        ``(B,)`` int64 global cell indices (numpy, stays on the CPU).
    """

    gene_ids: torch.Tensor
    values: torch.Tensor
    padding_mask: torch.Tensor
    gene_mask: torch.Tensor
    positions: Mapping[str, torch.Tensor]
    cell_idx: np.ndarray = field(repr=False)

    @property
    def size(self) -> int:
        """Number of cells in the batch."""
        return int(self.gene_ids.shape[0])

    @property
    def device(self) -> torch.device:
        """Device of the tensors."""
        return self.gene_ids.device

    def _map(self, fn: Any) -> TokenBatch:
        return TokenBatch(
            gene_ids=fn(self.gene_ids),
            values=fn(self.values),
            padding_mask=fn(self.padding_mask),
            gene_mask=fn(self.gene_mask),
            positions={k: fn(v) for k, v in self.positions.items()},
            cell_idx=self.cell_idx,
        )

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> TokenBatch:
        """Return the batch on ``device`` (non-blocking copies need pinned memory to overlap)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> TokenBatch:
        """Return the batch in page-locked CPU memory (for asynchronous copies to CUDA)."""
        return self._map(lambda t: t.pin_memory())

    def pooling_info(self) -> PoolingInfo:
        """Return the pooling information of this batch."""
        return PoolingInfo(gene_mask=self.gene_mask, positions=self.positions)


def looks_like_ensembl(ids: Sequence[str]) -> bool:
    """Return True when most ids look like Ensembl gene ids (``ENSG00000141510``, ``ENSMUSG…``)."""
    ids = [str(i) for i in ids]
    if not ids:
        return False
    hits = sum(1 for i in ids if _ENSEMBL_RE.match(i))
    return hits > len(ids) / 2


def map_to_vocab(
    gene_ids: Sequence[str],
    vocab: Mapping[str, int],
    *,
    model: str,
    min_fraction: float = 0.10,
    min_matched: int = 10,
) -> GeneMapping:
    """Map dataset gene ids to token ids of a vocabulary, with clear errors for bad input.

    Special tokens (``<pad>``, ``<cls>``, ...) never match. Ensembl ids with a version suffix
    (``ENSG00000141510.17``) also match the unversioned id when the vocabulary has no versions.

    Parameters
    ----------
    gene_ids
        Gene id of each dataset column, in ``adata.var`` order.
    vocab
        ``{gene id: token id}`` of the model.
    model
        Model name used in messages.
    min_fraction, min_matched
        Fewer matched genes than ``min_fraction`` of the dataset, or than
        ``min(min_matched, n_vars)``, is an error.

    Returns
    -------
    GeneMapping

    Raises
    ------
    InvalidInputError
        If the ids look like the wrong id type (symbols vs Ensembl ids) or too few genes match.
    """
    ids = [str(g) for g in gene_ids]
    n_vars = len(ids)
    if n_vars == 0:
        raise InvalidInputError("the dataset has no genes (var is empty); nothing to embed")
    genes = [k for k in vocab if not k.startswith("<")]
    vocab_ensembl = looks_like_ensembl(genes[:2000])
    data_ensembl = looks_like_ensembl(ids)
    want = "Ensembl ids" if vocab_ensembl else "gene symbols"
    example_col = "ensembl_id" if vocab_ensembl else "gene_symbols"
    if vocab_ensembl != data_ensembl:
        have = "Ensembl ids" if data_ensembl else "gene symbols"
        msg = (
            f"gene ids look like {have} (e.g. {', '.join(map(repr, ids[:3]))}) but {model} uses {want} "
            f"(e.g. {genes[0]!r}): pass the var column holding {want}, e.g. --gene-column {example_col}"
        )
        raise InvalidInputError(msg)
    var_index: list[int] = []
    token_ids: list[int] = []
    for i, gid in enumerate(ids):
        tok = vocab.get(gid)
        if tok is None and vocab_ensembl:
            tok = vocab.get(_VERSION_RE.sub("", gid))
        if tok is not None and not gid.startswith("<"):
            var_index.append(i)
            token_ids.append(int(tok))
    mapping = GeneMapping(
        var_index=np.asarray(var_index, dtype=np.int64),
        token_ids=np.asarray(token_ids, dtype=np.int64),
        n_vars=n_vars,
    )
    need = min(min_matched, n_vars)
    if mapping.n_matched < need or mapping.n_matched < min_fraction * n_vars or mapping.n_matched == 0:
        msg = (
            f"only {mapping.n_matched} of {n_vars} gene ids ({100 * mapping.n_matched / n_vars:.1f}%) are in "
            f"the vocabulary of {model} ({len(genes)} {want}); pass the var column holding {want} "
            f"with --gene-column (e.g. --gene-column {example_col}) or use a model that knows these genes"
        )
        raise InvalidInputError(msg)
    logger.info("gene mapping for %s: %d/%d genes matched", model, mapping.n_matched, n_vars)
    return mapping


def cell_generator(seed: int, cell_idx: int) -> torch.Generator:
    """Return a torch CPU generator seeded from ``(seed, cell_idx)`` only.

    A cell's random choices then depend neither on its batch nor on where a run resumed.
    """
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(cell_idx)]).generate_state(2, np.uint32)
    gen = torch.Generator(device="cpu")
    gen.manual_seed((int(state[0]) << 31) ^ int(state[1]))
    return gen


def _file_digest(path: Path) -> str:
    def compute() -> str:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    return cached_digest(path, "sha256", compute)


def hash_files(paths: Sequence[Path]) -> str:
    """Return a sha256 over the names, sizes and contents of files.

    Each file's digest comes from the persistent digest cache (:mod:`sclstore.store.hashcache`)
    when the file is unchanged, so a repeated ingest does not re-read a 20 GB checkpoint.
    """
    h = hashlib.sha256()
    for path in paths:
        h.update(f"{path.name}\0{path.stat().st_size}\0{_file_digest(path)}\n".encode())
    return h.hexdigest()


_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(requested: str, official: str, device: torch.device) -> str:
    """The precision a run uses: ``auto`` -> ``official`` on CUDA, ``fp32`` elsewhere; else ``requested``.

    Raises
    ------
    InvalidInputError
        If ``requested`` is not one of ``auto``, ``fp32``, ``bf16``, ``fp16``.
    """
    if requested == "auto":
        return official if device.type == "cuda" else "fp32"
    if requested not in ("fp32", *_AUTOCAST_DTYPES):
        raise InvalidInputError(f"precision {requested!r} is not one of auto, fp32, bf16, fp16")
    return requested


def autocast_for(device: torch.device, precision: str | None = None) -> contextlib.AbstractContextManager[Any]:
    """Autocast to ``precision`` (``bf16``/``fp16``) on ``device``; nothing for ``fp32``.

    ``precision=None`` (legacy default): bf16 on CUDA, fp32 elsewhere.
    """
    if precision is None:
        precision = "bf16" if device.type == "cuda" else "fp32"
    dtype = _AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@dataclass(frozen=True)
class OfficialEmbedding:
    """A family's official cell embedding, as data over the stored vectors.

    Attributes
    ----------
    layer
        Stored layer (0 = embedding output, ``l`` = output of block ``l``).
    pools
        Stored pools concatenated in this order (one pool: that vector).
    final_norm
        Apply the model's final norm (:meth:`ModelAdapter.apply_final_norm`) to each pooled
        vector first (stored layers exclude it, e.g. Tahoe-X1).
    l2_normalise
        L2-normalise the result (Tahoe-X1, scGPT).
    """

    layer: int
    pools: tuple[str, ...]
    final_norm: bool = False
    l2_normalise: bool = False


def official_from_stored(
    spec: OfficialEmbedding, stored: Mapping[str, Any], final_norm: Any = None
) -> torch.Tensor:
    """The official embedding from stored pooled vectors ``{pool: (n_cells, d)}`` of ``spec.layer``.

    Raises
    ------
    InvalidInputError
        If a declared pool is missing.
    """
    parts = []
    for pool in spec.pools:
        if pool not in stored:
            raise InvalidInputError(f"the official embedding needs pool {pool!r}; ingest with --pool {','.join(spec.pools)}")
        x = torch.as_tensor(np.asarray(stored[pool])) if not isinstance(stored[pool], torch.Tensor) else stored[pool]
        x = x.to(torch.float32)
        if spec.final_norm:
            x = final_norm(x).to(torch.float32)
        parts.append(x)
    out = torch.cat(parts, dim=-1)
    return torch.nn.functional.normalize(out, p=2, dim=-1) if spec.l2_normalise else out


class ModelAdapter(ABC, Generic[ModelT]):
    """One model checkpoint, seen by the ingest pipeline.

    Subclasses set the class/instance attributes below and implement :meth:`_new_model` (the
    network), :meth:`_encoder_state` (its weights, checked strictly) and :meth:`_encode`. Shared:
    building and loading (:meth:`build_model`, :meth:`load`), the blocks of a model exposing them
    as ``model.blocks`` (:meth:`blocks`), the catalog summary around :meth:`_describe_checkpoint`
    and :meth:`_describe_layers`, hooking and pooling (:meth:`embed`).

    Attributes
    ----------
    family, name
        Model family (``"tahoe-x1"``) and checkpoint name.
    n_layers
        Number of blocks ``L``; stored layers are ``0..L``.
    d_model
        Width of every stored vector.
    supported_pools, default_pools
        Pools :meth:`embed` can compute, and those used when the user names none.
    tokenizer
        Bound to the last :meth:`map_genes` result.
    files
        The checkpoint's located files; ``files.weights`` is the weight file :meth:`load` reads.
    model
        The network, once :meth:`load` has built it.
    """

    family: str = ""
    name: str
    n_layers: int
    d_model: int
    supported_pools: tuple[str, ...] = ("cls", "mean", "max")
    default_pools: tuple[str, ...] = ("cls", "mean")
    tokenizer: Tokenizer
    files: Any
    model: ModelT | None = None

    _device: torch.device | None = None

    # --- identity -------------------------------------------------------------------------
    @functools.cached_property
    def checkpoint_hash(self) -> str:
        """sha256 over the checkpoint's config, vocabulary and weight files (no model built).

        Default: :func:`hash_files` over ``files.all()``, which lists them in hashing order.
        """
        return hash_files(self.files.all())

    def effective_options(self) -> dict[str, str]:
        """The model options as applied, defaults filled in (``--model-option``; default: none).

        They enter the run's cache key in place of the options as typed, so spelling out a
        default is a cache hit.
        """
        return {}

    def describe(self) -> dict[str, Any]:
        """Return a JSON-able summary of the checkpoint for the catalog.

        ``family`` and ``name``, then :meth:`_describe_checkpoint`, the pools and precision, then
        :meth:`_describe_layers`.
        """
        return {
            "family": self.family,
            "name": self.name,
            **self._describe_checkpoint(),
            "supported_pools": list(self.supported_pools),
            "default_pools": list(self.default_pools),
            "official_precision": self.official_precision,
            "precision": {"cuda": f"{self.official_precision} (official)", "cpu": "fp32"},
            **self._describe_layers(),
        }

    @abstractmethod
    def _describe_checkpoint(self) -> dict[str, Any]:
        """Architecture, vocabulary, input encoding and checkpoint files, for :meth:`describe`."""

    @abstractmethod
    def _describe_layers(self) -> dict[str, Any]:
        """What the stored layers hold and how the official embedding follows, for :meth:`describe`."""

    # --- data -----------------------------------------------------------------------------
    @abstractmethod
    def map_genes(self, gene_ids: Sequence[str]) -> GeneMapping:
        """Map dataset gene ids to the vocabulary and bind :attr:`tokenizer` to the result."""

    @abstractmethod
    def collate(self, records: list[Any]) -> TokenBatch:
        """Pad records into a CPU batch."""

    def check_obs(self, obs: Any) -> Any:
        """Validate the cell metadata this model reads (default: none); raise ``InvalidInputError``."""
        return None

    official_precision: str = "fp32"
    """The precision the family's official inference code runs in on CUDA (``fp32``, ``bf16``, ``fp16``)."""
    precision: str = "auto"
    """The precision of this adapter's forward passes (``auto``: :attr:`official_precision` on CUDA, fp32 elsewhere)."""

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The autocast context of :attr:`precision` on this adapter's device."""
        device = self.device
        return autocast_for(device, resolve_precision(self.precision, self.official_precision, device))

    def observe_source(self, *, dense: bool, dtype: Any) -> None:
        """Learn how the dataset stores its counts (dense or sparse, dtype), before tokenizing.

        Default: nothing; a family whose official arithmetic depends on it (Geneformer) rebinds
        its tokenizer.
        """
        return None

    # --- model ----------------------------------------------------------------------------
    @abstractmethod
    def _new_model(self) -> ModelT:
        """The network of the checkpoint's config, with fresh weights."""

    @abstractmethod
    def _encoder_state(self, expected: Mapping[str, torch.Size]) -> Mapping[str, torch.Tensor]:
        """Read the checkpoint and return exactly the ``expected`` weights, checked strictly.

        Raises
        ------
        CheckpointError
            If a weight is missing or misshapen, or a key is neither expected nor an allow-listed head.
        """

    def build_model(self) -> ModelT:
        """Return the network with the checkpoint's weights loaded strictly (on the CPU, fp32, eval mode).

        Raises
        ------
        CheckpointError
            If an encoder weight is missing or misshapen, or a key is neither encoder nor an
            allow-listed head.
        """
        model = self._new_model()
        expected = {k: v.shape for k, v in model.state_dict().items()}
        encoder = self._encoder_state(expected)
        model.load_state_dict({k: v.float() for k, v in encoder.items()}, strict=True)
        return model.eval()

    def load(self, device: torch.device | str) -> None:
        """Build the network, load the weights strictly and move it to ``device`` (idempotent)."""
        device = torch.device(device)
        if self.model is None:
            files = getattr(self, "files", None)
            logging.getLogger(type(self).__module__).info("loading %s weights from %s", self.name,
                                                          getattr(files, "weights", "its factory"))
            self.model = self.build_model()
        if self._device != device:
            self.model.to(device)
            self._device = device

    def blocks(self) -> Sequence[nn.Module]:
        """The ``L`` transformer blocks in forward order, ``model.blocks`` (valid after :meth:`load`)."""
        return list(cast("Iterable[nn.Module]", self._require_model().blocks))

    def _require_model(self) -> ModelT:
        """The loaded network; raises ``ModelError`` before :meth:`load`."""
        if self.model is None:
            raise ModelError(self._not_loaded())
        return self.model

    def _not_loaded(self) -> str:
        return f"{self.family} model {self.name!r} is not loaded: call adapter.load(device) first"

    @abstractmethod
    def _encode(self, batch: TokenBatch, *, n_blocks: int | None = None) -> torch.Tensor:
        """Run the encoder through its first ``n_blocks`` blocks (all when None); return hidden states."""

    @property
    def official(self) -> OfficialEmbedding:
        """The family's official cell embedding, declared as data over the stored vectors."""
        raise NotImplementedError(f"{type(self).__name__} declares no official embedding")

    def apply_final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The model's final norm applied to pooled vectors (families whose official embedding needs it)."""
        raise ModelError(f"{self.family} has no final norm outside its stored layers")

    def official_embedding(self, batch: TokenBatch) -> torch.Tensor:
        """``(B, d)`` float32 official cell embedding, from an independent forward pass (tests compare it
        with :attr:`official` applied to the stored vectors). Default: :attr:`official` over :meth:`embed`."""
        spec = self.official
        pooled = self.embed(batch, layers=[spec.layer], pools=list(dict.fromkeys(spec.pools)))
        return official_from_stored(spec, {p: v[0] for p, v in pooled.items()}, self.apply_final_norm)

    def final_transform(self, pooled_last: torch.Tensor) -> torch.Tensor:
        """Map stored ``cls`` vectors of the official layer ``(B, d)`` to the official embedding."""
        spec = self.official
        return official_from_stored(spec, {spec.pools[0]: pooled_last}, self.apply_final_norm)

    # --- shared machinery -------------------------------------------------------------------
    @property
    def is_loaded(self) -> bool:
        """Whether :meth:`load` has run."""
        return self._device is not None

    @property
    def device(self) -> torch.device:
        """Device of the loaded model.

        Raises
        ------
        ModelError
            If the weights are not loaded yet.
        """
        if self._device is None:
            raise ModelError(self._not_loaded())
        return self._device

    def _on_device(self, batch: TokenBatch) -> TokenBatch:
        """``batch`` on the model's device (copied if needed; ``ModelError`` before :meth:`load`)."""
        device = self.device
        return batch.to(device) if batch.device != device else batch

    def _check_width(self, vectors: torch.Tensor) -> None:
        """Raise ``InvalidInputError`` unless ``vectors`` have ``d_model`` columns."""
        if vectors.shape[-1] != self.d_model:
            raise InvalidInputError(f"expected vectors of size {self.d_model}, got {tuple(vectors.shape)}")

    def _check_request(self, layers: Sequence[int], pools: Sequence[str]) -> None:
        bad_pools = [p for p in pools if p not in self.supported_pools]
        if bad_pools or not pools:
            msg = (
                f"pools {bad_pools or list(pools)} not supported by {self.family}; "
                f"use {', '.join(self.supported_pools)}"
            )
            raise InvalidInputError(msg)
        bad = [layer for layer in layers if not 0 <= int(layer) <= self.n_layers]
        if bad or not layers:
            msg = f"layers {bad or list(layers)} out of range: {self.name} has layers 0..{self.n_layers}"
            raise InvalidInputError(msg)

    @torch.no_grad()
    def embed(self, batch: TokenBatch, *, layers: Sequence[int], pools: Sequence[str]) -> dict[str, torch.Tensor]:
        """Run one forward pass and return the pooled embeddings of the kept layers.

        Parameters
        ----------
        batch
            A batch from :meth:`collate`, best already on the model's device (moved otherwise).
        layers
            Stored layer numbers to keep (``0..n_layers``), in output order.
        pools
            Pools to compute, each in :attr:`supported_pools`.

        Returns
        -------
        dict of str to torch.Tensor
            ``{pool: float32 (len(layers), B, d_model)}`` on the batch's device.

        Raises
        ------
        InvalidInputError
            If a layer or pool is not valid for this model.
        ModelError
            If the model is not loaded.
        """
        layers, pools = [int(x) for x in layers], list(pools)
        self._check_request(layers, pools)
        batch = self._on_device(batch)
        with (
            self.autocast(),
            LayerCapture(self.blocks(), layers=layers, pools=pools, info=batch.pooling_info()) as cap,
        ):
            self._encode(batch, n_blocks=max(max(layers), 1))  # layer 0 is seen by block 0's pre-hook
        return cap.result()
