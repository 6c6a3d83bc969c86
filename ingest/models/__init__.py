"""Model adapters, by family.

Families are discovered through the entry-point group ``sclstore.models``
(:mod:`sclstore.ingest.family`): each maps a family name to a factory
``(checkpoint, max_genes, options) -> ModelAdapter``. The built-in families below are registered
the same way in sclstore's ``pyproject.toml`` (and used as a fallback when the package metadata is
absent); families without model options refuse any. ``sclstore-tiny`` is the built-in model (a small
Tahoe-X1 trained by :mod:`sclstore.ingest.models.train_tiny`, shipped in
``sclstore-tiny/``) and needs no checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import cast

from sclstore.store.errors import InvalidInputError

from ..adapter import ModelAdapter
from ..family import discover_families
from .geneformer.adapter import from_checkpoint as _geneformer
from .scfoundation.adapter import scfoundation_factory as _scfoundation
from .scgpt.adapter import from_checkpoint as _scgpt
from .tahoe.adapter import TahoeAdapter

__all__ = ["FAMILIES", "TINY_CHECKPOINT", "families", "load_adapter"]

logger = logging.getLogger(__name__)

TINY_CHECKPOINT = Path(__file__).resolve().parent / "sclstore-tiny"
"""Folder of the committed sclstore-tiny checkpoint (Tahoe-X1 HF layout)."""

AdapterFactory = Callable[[Path | None, int | None, Mapping[str, str]], ModelAdapter]


def _no_options(family: str, factory: Callable[[Path | None, int | None], ModelAdapter]) -> AdapterFactory:
    """The factory of a family that has no model options: it refuses any."""

    def make(checkpoint: Path | None, max_genes: int | None, options: Mapping[str, str]) -> ModelAdapter:
        if options:
            given = ", ".join(f"{k}={v}" for k, v in options.items())
            msg = (f"model family {family!r} takes no model options (got {given}); model options: scfoundation "
                   "(sub_model, tgthighres), tahoe-x1 (softmax_scale)")
            raise InvalidInputError(msg)
        return factory(checkpoint, max_genes)

    return make


_TAHOE_OPTIONS = {"softmax_scale": ("official", "config")}


def _tahoe_options(family: str, factory: Callable[..., ModelAdapter]) -> AdapterFactory:
    """Tahoe-X1 factories take ``softmax_scale=official`` (default, as upstream: the config value is
    ignored) or ``softmax_scale=config`` (apply ``attn_config.softmax_scale``)."""

    def make(checkpoint: Path | None, max_genes: int | None, options: Mapping[str, str]) -> ModelAdapter:
        for key, value in options.items():
            allowed = _TAHOE_OPTIONS.get(key)
            if allowed is None or value not in allowed:
                msg = (f"model option {key}={value} is not one of {family!r}'s: softmax_scale=official (default) or "
                       "softmax_scale=config")
                raise InvalidInputError(msg)
        return factory(checkpoint, max_genes, apply_softmax_scale=options.get("softmax_scale") == "config")

    return make


def _tahoe(checkpoint: Path | None, max_genes: int | None, *, apply_softmax_scale: bool = False) -> ModelAdapter:
    if checkpoint is None:
        msg = (
            "model family 'tahoe-x1' needs --checkpoint DIR: a folder with model_config.yml, "
            "collator_config.yml, vocab.json and model.safetensors (e.g. the HF '70m-model' folder)"
        )
        raise InvalidInputError(msg)
    return TahoeAdapter(checkpoint, max_genes=max_genes, apply_softmax_scale=apply_softmax_scale)


def _tiny(checkpoint: Path | None, max_genes: int | None, *, apply_softmax_scale: bool = False) -> ModelAdapter:
    folder = checkpoint or TINY_CHECKPOINT
    return TahoeAdapter(folder, max_genes=max_genes, family="sclstore-tiny", name="sclstore-tiny",
                        apply_softmax_scale=apply_softmax_scale)


tahoe_x1_factory = _tahoe_options("tahoe-x1", _tahoe)
sclstore_tiny_factory = _tahoe_options("sclstore-tiny", _tiny)
geneformer_factory = _no_options("geneformer", _geneformer)
scgpt_factory = _no_options("scgpt", _scgpt)
scfoundation_factory = _scfoundation

FAMILIES: dict[str, AdapterFactory] = {
    "tahoe-x1": tahoe_x1_factory,
    "sclstore-tiny": sclstore_tiny_factory,
    "geneformer": geneformer_factory,
    "scgpt": scgpt_factory,
    "scfoundation": scfoundation_factory,
}
"""The built-in families (also registered as ``sclstore.models`` entry points)."""


def families() -> dict[str, AdapterFactory]:
    """Every model family: those registered under the ``sclstore.models`` entry-point group, plus
    the built-ins (a plugin may not replace a built-in family's name)."""
    found = cast("dict[str, AdapterFactory]", discover_families())  # the code treats every family as an adapter
    clash = sorted(n for n in found if n in FAMILIES and found[n] is not FAMILIES[n])
    for name in clash:
        logger.warning("entry point %r of another package is ignored: it is a built-in sclstore family", name)
    return {**found, **FAMILIES}


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
    known = families()
    factory = known.get(family)
    if factory is None:
        msg = (f"unknown model family {family!r}; choose one of: {', '.join(sorted(known))} (or install a package "
               "registering it under the 'sclstore.models' entry-point group)")
        raise InvalidInputError(msg)
    return factory(None if checkpoint is None else Path(checkpoint), max_genes, dict(options or {}))
