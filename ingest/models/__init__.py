"""Model adapters, by family.

The registry is explicit: :data:`FAMILIES` maps a family name to a factory
``(checkpoint, max_genes, options) -> ModelAdapter``; families without model options refuse any. ``sclstore-tiny`` is the built-in model (a small
Tahoe-X1 trained by :mod:`sclstore.ingest.models.train_tiny`, shipped in
``sclstore-tiny/``) and needs no checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from sclstore.store.errors import InvalidInputError

from ..adapter import ModelAdapter
from .geneformer import from_checkpoint as _geneformer
from .scfoundation import scfoundation_factory as _scfoundation
from .scgpt import from_checkpoint as _scgpt
from .tahoe import TahoeAdapter

__all__ = ["FAMILIES", "TINY_CHECKPOINT", "load_adapter"]

TINY_CHECKPOINT = Path(__file__).resolve().parent / "sclstore-tiny"
"""Folder of the committed sclstore-tiny checkpoint (Tahoe-X1 HF layout)."""

AdapterFactory = Callable[[Path | None, int | None, Mapping[str, str]], ModelAdapter]


def _no_options(family: str, factory: Callable[[Path | None, int | None], ModelAdapter]) -> AdapterFactory:
    """The factory of a family that has no model options: it refuses any."""

    def make(checkpoint: Path | None, max_genes: int | None, options: Mapping[str, str]) -> ModelAdapter:
        if options:
            given = ", ".join(f"{k}={v}" for k, v in options.items())
            msg = f"model family {family!r} takes no model options (got {given}); only scfoundation has any (sub_model, tgthighres)"
            raise InvalidInputError(msg)
        return factory(checkpoint, max_genes)

    return make


def _tahoe(checkpoint: Path | None, max_genes: int | None) -> ModelAdapter:
    if checkpoint is None:
        msg = (
            "model family 'tahoe-x1' needs --checkpoint DIR: a folder with model_config.yml, "
            "collator_config.yml, vocab.json and model.safetensors (e.g. the HF '70m-model' folder)"
        )
        raise InvalidInputError(msg)
    return TahoeAdapter(checkpoint, max_genes=max_genes)


def _tiny(checkpoint: Path | None, max_genes: int | None) -> ModelAdapter:
    folder = checkpoint or TINY_CHECKPOINT
    return TahoeAdapter(folder, max_genes=max_genes, family="sclstore-tiny", name="sclstore-tiny")


FAMILIES: dict[str, AdapterFactory] = {
    "tahoe-x1": _no_options("tahoe-x1", _tahoe),
    "sclstore-tiny": _no_options("sclstore-tiny", _tiny),
    "geneformer": _no_options("geneformer", _geneformer),
    "scgpt": _no_options("scgpt", _scgpt),
    "scfoundation": _scfoundation,
}


def load_adapter(
    family: str, checkpoint: str | Path | None = None, *, max_genes: int | None = None,
    options: Mapping[str, str] | None = None,
) -> ModelAdapter:
    """Return the adapter of a model family for a checkpoint, without loading weights.

    Parameters
    ----------
    family
        One of :data:`FAMILIES` (e.g. ``"tahoe-x1"``, ``"sclstore-tiny"``).
    checkpoint
        Checkpoint folder; not needed for ``"sclstore-tiny"`` (default: the packaged one).
    max_genes
        Maximum sequence length in tokens (``<cls>`` included); the model's default when None.
    options
        Model-specific options (``--model-option``); only scFoundation has any
        (``sub_model``, ``tgthighres``).

    Returns
    -------
    ModelAdapter
        Configs and vocabulary read; call ``load(device)`` before ``embed``.

    Raises
    ------
    InvalidInputError
        If the family is unknown or needs a checkpoint that was not given.
    CheckpointError
        If the checkpoint folder is incomplete or invalid.

    Examples
    --------
    >>> adapter = load_adapter("sclstore-tiny")
    >>> adapter.n_layers, adapter.d_model
    (6, 64)
    """
    factory = FAMILIES.get(family)
    if factory is None:
        msg = f"unknown model family {family!r}; choose one of: {', '.join(sorted(FAMILIES))}"
        raise InvalidInputError(msg)
    return factory(None if checkpoint is None else Path(checkpoint), max_genes, dict(options or {}))
