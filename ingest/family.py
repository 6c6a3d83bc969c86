"""The model-family plugin seam: what a family provides, and how sclstore finds families.

A family is discovered through the ``importlib.metadata`` entry-point group ``sclstore.models``:
each entry point is named after the family (``--model NAME``) and loads a *factory*
``(checkpoint: Path | None, max_genes: int | None, options: Mapping[str, str]) -> ModelFamily``.
sclstore's built-in families are registered the same way in its own ``pyproject.toml``; a lab adds
its own model by publishing a package with such an entry point, e.g.::

    [project.entry-points."sclstore.models"]
    my-model = "my_package.sclstore_plugin:factory"

What the pipeline needs from the object the factory returns is :class:`ModelFamily`:

1. **prepare genes** -- :meth:`ModelFamily.map_genes` maps the dataset's gene ids and binds
   :attr:`ModelFamily.tokenizer`: an immutable, picklable object (no weights) whose
   ``tokenize(counts, cell_idx, seed=...)`` turns raw-count rows into token records (numpy only;
   it runs in worker processes); a record with ``embeddable=False`` is stored as NaN;
2. **collate** -- :meth:`ModelFamily.collate` pads records into a batch;
3. **forward with per-block hooks** -- :meth:`ModelFamily.load` then :meth:`ModelFamily.embed`
   returns ``{pool: (n_layers_kept, B, d) float32}``; the shared base class
   :class:`~sclstore.ingest.adapter.ModelAdapter` implements it from ``_new_model`` /
   ``_encoder_state`` / ``_encode`` with a hook on every block that pools inside the hook;
4. **declared pools** -- :attr:`ModelFamily.supported_pools` / :attr:`ModelFamily.default_pools`;
5. **declared official embedding** -- :attr:`ModelFamily.official` (:class:`OfficialEmbedding`):
   which stored layer and pools make the family's official cell embedding, and the transform;
   one generic test (``tests/ingest/test_families.py``) checks every family's declaration against
   its own ``official_embedding`` forward.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from .adapter import GeneMapping, OfficialEmbedding, TokenBatch, official_from_stored

__all__ = [
    "ENTRY_POINT_GROUP",
    "FamilyFactory",
    "ModelFamily",
    "OfficialEmbedding",
    "discover_families",
    "official_from_stored",
]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "sclstore.models"
"""The entry-point group families are registered under."""

FamilyFactory = Callable[[Path | None, int | None, Mapping[str, str]], "ModelFamily"]


@runtime_checkable
class ModelFamily(Protocol):
    """What the ingest pipeline uses of a model family's adapter (see the module docstring)."""

    family: str
    name: str
    n_layers: int
    d_model: int
    supported_pools: tuple[str, ...]
    default_pools: tuple[str, ...]
    official_precision: Literal["fp32", "bf16", "fp16"] | str
    precision: str
    tokenizer: Any

    @property
    def checkpoint_hash(self) -> str: ...

    @property
    def official(self) -> OfficialEmbedding: ...

    def describe(self) -> dict[str, Any]: ...

    def map_genes(self, gene_ids: Sequence[str]) -> GeneMapping: ...

    def check_obs(self, obs: Any) -> Any: ...

    def observe_source(self, *, dense: bool, dtype: Any) -> None: ...

    def collate(self, records: list[Any]) -> TokenBatch: ...

    def load(self, device: torch.device | str = ...) -> Any: ...

    def embed(self, batch: TokenBatch, *, layers: Sequence[int], pools: Sequence[str]) -> dict[str, torch.Tensor]: ...


def discover_families(builtin: Mapping[str, FamilyFactory] | None = None) -> dict[str, FamilyFactory]:
    """Families registered under :data:`ENTRY_POINT_GROUP`, plus ``builtin`` ones not registered.

    An entry point that fails to load is skipped with a warning naming it (a broken plugin must
    not break the other families).
    """
    found: dict[str, FamilyFactory] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found:
            continue
        try:
            obj = ep.load()
        except Exception as exc:
            logger.warning("model family %r (entry point %s) cannot be loaded: %s", ep.name, ep.value, exc)
            continue
        if not callable(obj):
            logger.warning("model family %r (entry point %s) is not a factory; ignored", ep.name, ep.value)
            continue
        found[ep.name] = obj
    for name, factory in (builtin or {}).items():
        found.setdefault(name, factory)
    return found
