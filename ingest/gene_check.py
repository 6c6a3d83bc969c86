"""Refuse dataset gene columns that map to the same model token.

Two ``var`` columns with the same gene id (or two versions of one Ensembl id) would give a
cell that gene twice. The official tokenizers disagree on such input (scGPT and Tahoe-X1 map
every column on its own and feed the gene twice; Geneformer V2 sums the counts of duplicated
Ensembl ids; scFoundation's pandas column selection keeps an arbitrary one), so there is no
official result to reproduce: sclstore refuses it with one line and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sclstore.store.errors import InvalidInputError

from .adapter import GeneMapping

__all__ = ["check_unique_tokens"]


def check_unique_tokens(gene_ids: Sequence[str], mapping: GeneMapping) -> None:
    """Raise ``InvalidInputError`` if two matched columns map to one token id.

    Raises
    ------
    InvalidInputError
        Naming the first repeated gene, its two columns and the fix.
    """
    tokens = np.asarray(mapping.token_ids)
    if tokens.size == np.unique(tokens).size:
        return
    order = np.argsort(tokens, kind="stable")
    dup = int(np.flatnonzero(tokens[order][1:] == tokens[order][:-1])[0])
    a, b = sorted((int(mapping.var_index[order[dup]]), int(mapping.var_index[order[dup + 1]])))
    n = int(tokens.size - np.unique(tokens).size)
    msg = (
        f"gene id {str(gene_ids[b])!r} appears in var columns {a} and {b} ({str(gene_ids[a])!r}; {n} repeated gene(s) in "
        "all): the model would see that gene twice; sum or drop the duplicates (e.g. keep the first: "
        "adata[:, ~adata.var_names.duplicated()]) or pass --gene-column with unique ids"
    )
    raise InvalidInputError(msg)
