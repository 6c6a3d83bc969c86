"""``sclstore verify``: each run's array against its catalog row, and direct reads against libtiledb."""

from __future__ import annotations

from typing import Any

import numpy as np
import tiledb

from . import arrays
from .errors import SclstoreError
from .info import RunInfo

__all__ = ["compare_direct", "verify_run"]


def verify_run(info: RunInfo, *, direct_reads: bool = True, ctx: tiledb.Ctx | None = None, seed: int | None = None) -> dict[str, Any]:
    """Check one run's array: existence, shape, pools, encoding, layers, written extent.

    Returns
    -------
    dict
        ``{"run", "label", "status", "ok", "problems": [...], "direct_reads"}``; ``direct_reads``
        says whether reads of the run bypass libtiledb (after agreeing with it on a sample).
    """
    problems: list[str] = []
    try:
        a = arrays.array_info(info.array_uri, ctx=ctx)
    except SclstoreError as exc:
        problems.append(f"array missing or unreadable: {exc}")
    else:
        want = (len(info.layers), info.n_cells, info.dim)
        if a["shape"] != want:
            problems.append(f"array shape {a['shape']} != catalog {want}")
        if tuple(a["pools"]) != info.pools:
            problems.append(f"array pools {a['pools']} != catalog {info.pools}")
        if a["encoding_version"] != info.encoding_version or a["dtype"] != info.dtype:
            problems.append(f"array encoding {a['encoding_version']}/{a['dtype']} != catalog {info.encoding_version}/{info.dtype}")
        if tuple(a["layers"]) != info.layers:
            problems.append(f"array layers {a['layers']} != catalog {info.layers}")
        if info.status == "complete" and a["written_cells"] != (0, info.n_cells - 1):
            problems.append(f"written cells {a['written_cells']} do not cover 0..{info.n_cells - 1}")
    direct = False
    if not problems and info.status == "complete" and direct_reads:
        direct, mismatch = compare_direct(info, ctx=ctx, seed=seed)
        problems.extend(mismatch)
    return {"run": info.id, "label": info.label, "status": info.status, "ok": not problems, "problems": problems,
            "direct_reads": direct}


def compare_direct(info: RunInfo, *, ctx: tiledb.Ctx | None = None, seed: int | None = None, n_tiles: int = 8) -> tuple[bool, list[str]]:
    """Whether the run's array is read straight from its tile files, and whether those reads
    equal libtiledb's on ``n_tiles`` random cell tiles (always with the first and last) of
    random layer slots (always with the first and last), for every pool.

    ``seed`` fixes the sample (default: a fresh one each call, so repeated verifies cover more).
    """
    with arrays.ArrayReader(info.array_uri, ctx=ctx) as fast:
        if not fast.direct:
            return False, []
        rng = np.random.default_rng(seed)
        n, c = info.n_cells, fast.cell_tile
        n_ct = -(-n // c)
        tiles = np.unique(np.concatenate([[0, n_ct - 1], rng.choice(n_ct, size=min(n_ct, n_tiles), replace=False)]))
        cells = np.unique(np.concatenate([np.arange(t * c, min(n, t * c + c)) for t in tiles]))
        slots = sorted({0, fast.n_slots - 1, *(int(x) for x in rng.choice(fast.n_slots, size=min(fast.n_slots, 2), replace=False))})
        with arrays.ArrayReader(info.array_uri, ctx=ctx, direct=False) as slow:
            for pool in info.pools:
                if not np.array_equal(fast.read(slots, cells, pool), slow.read(slots, cells, pool), equal_nan=True):
                    msg = (f"direct tile reads of pool {pool} differ from libtiledb's: open the store with "
                           "StoreSettings(direct_reads=False) and report this")
                    return True, [msg]
    return True, []
