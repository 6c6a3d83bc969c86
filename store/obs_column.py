"""One obs column's description (kept in ``datasets.obs_schema``); no SQLAlchemy or pandas needed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["MAX_KEPT_CATEGORIES", "ObsColumn", "ObsKind"]

ObsKind = Literal["category", "string", "int", "float", "bool"]


MAX_KEPT_CATEGORIES = 10_000
"""Category lists up to this length are kept in the catalog (their order and ``ordered`` flag)."""


@dataclass(frozen=True)
class ObsColumn:
    """One obs column: its user-facing name, its SQL column and its kind.

    For categorical columns, ``categories`` keeps the AnnData's category order (and ``ordered``
    its flag), so a developmental-stage column comes back in stage order, not alphabetically;
    ``None`` (older catalogs, or more than :data:`MAX_KEPT_CATEGORIES` categories) means
    code-point order.
    """

    name: str
    column: str
    kind: ObsKind
    categories: tuple[str, ...] | None = None
    ordered: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "column": self.column, "kind": self.kind}
        if self.categories is not None:
            out["categories"] = list(self.categories)
            out["ordered"] = self.ordered
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ObsColumn:
        cats = data.get("categories")
        return cls(name=str(data["name"]), column=str(data["column"]), kind=data["kind"],
                   categories=None if cats is None else tuple(str(c) for c in cats), ordered=bool(data.get("ordered", False)))
