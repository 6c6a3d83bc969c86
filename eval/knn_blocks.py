"""Candidate lists of the blocked exact search (:mod:`sclstore.eval.knn_exact`): buffers, block scans, schedules.

Every cell keeps a buffer of candidate values and indices below its threshold; a full buffer is cut
to the ``keep`` best (:func:`select`) and the threshold drops to the last of them, so every value
refused or dropped is at least the final list's last -- the fact the exactness proof uses. A block
of products offers its values to the buffers of its rows and of its columns (:func:`scan`,
:func:`scan_int`; a diagonal block, visited first, fills each of its cells' buffers by one
selection); :func:`sweep` visits every block pair of the symmetric matrix once, on one thread or
several (in rounds of disjoint blocks, :func:`rounds`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numba
import numpy as np

__all__ = ["blas_threads", "block_pairs", "buffers", "finish", "rounds", "scan", "scan_int", "select", "sweep"]


@numba.njit(nogil=True, cache=True)
def select(v: np.ndarray, ix: np.ndarray, k: int) -> None:  # pragma: no cover - numba
    """Reorder ``v`` (and ``ix`` alike) so that ``v[:k]`` are its ``k`` smallest and ``v[k-1]`` the largest of them.

    Wirth's selection (Hoare partitions around the current ``k``-th element), linear on average.
    """
    lo, hi, kk = 0, v.shape[0] - 1, k - 1
    while lo < hi:
        x = v[kk]
        i, j = lo, hi
        while True:
            while v[i] < x:
                i += 1
            while x < v[j]:
                j -= 1
            if i <= j:
                v[i], v[j] = v[j], v[i]
                ix[i], ix[j] = ix[j], ix[i]
                i += 1
                j -= 1
            if i > j:
                break
        if j < kk:
            lo = i
        if kk < i:
            hi = j


@numba.njit(nogil=True, inline="always", cache=True)
def _push(bd: np.ndarray, bi: np.ndarray, count: np.ndarray, keep: int, r: int, d: float, j: int, t: float) -> float:  # pragma: no cover - numba
    """Append ``(d, j)`` to cell ``r``'s buffer; when full, keep its ``keep`` best. Returns the cell's threshold.

    The threshold is the ``keep``-th best value at the last compaction: every value dropped or
    refused since was at least the final list's last, which the proof of exactness needs.
    """
    c = count[r]
    bd[r, c] = d
    bi[r, c] = j
    c += 1
    if c == bd.shape[1]:
        select(bd[r], bi[r], keep)
        c = keep
        t = bd[r, keep - 1]
    count[r] = c
    return t


@numba.njit(nogil=True, inline="always", cache=True)
def _offer_row(row: np.ndarray, first: int, r: int, j0: int, tc: np.ndarray, bd: np.ndarray, bi: np.ndarray,
               count: np.ndarray, keep: int, pos: np.ndarray, t: float) -> float:  # pragma: no cover - numba
    """Offer ``row[first:]`` (cell ``r`` against cells ``j0 + b``) to ``r``'s buffer and to the columns'.

    A branch-free pass lists the columns whose value lies below ``r``'s threshold ``t`` or the
    column's ``tc[b]``; only those are offered. Returns ``r``'s new threshold.
    """
    m = 0
    for b in range(first, row.shape[0]):
        pos[m] = b
        m += (row[b] < t) | (row[b] < tc[b])
    for q in range(m):
        b = pos[q]
        v = row[b]
        if v < t:
            t = _push(bd, bi, count, keep, r, v, j0 + b, t)
        if v < tc[b]:
            tc[b] = _push(bd, bi, count, keep, j0 + b, v, r, tc[b])
    return t


@numba.njit(nogil=True, inline="always", cache=True)
def _seed(vals: np.ndarray, a: int, r: int, j0: int, row: np.ndarray, ix: np.ndarray, bd: np.ndarray, bi: np.ndarray,
          count: np.ndarray, keep: int, thr: np.ndarray) -> None:  # pragma: no cover - numba
    """Fill cell ``r``'s empty buffer with the ``keep`` best of ``vals`` (against cells ``j0 + b``; ``b = a`` is ``r``).

    One selection instead of a push per value: every value left out is at least the ``keep``-th
    kept, which becomes the threshold (as after a compaction); with ``keep`` or fewer values
    nothing is left out and the threshold stays unset.
    """
    m = 0
    for b in range(vals.shape[0]):
        if b != a:
            row[m] = vals[b]
            ix[m] = j0 + b
            m += 1
    if m > keep:
        select(row[:m], ix[:m], keep)
        m = keep
        thr[r] = row[keep - 1]
    bd[r, :m] = row[:m]
    bi[r, :m] = ix[:m]
    count[r] = m


@numba.njit(nogil=True, cache=True)
def _seed_block(D: np.ndarray, i0: int, bd: np.ndarray, bi: np.ndarray, count: np.ndarray, keep: int,
                thr: np.ndarray) -> None:  # pragma: no cover - numba
    """:func:`_seed` every row of a diagonal block whose cells have no candidates yet (the diagonal goes first)."""
    na = D.shape[0]
    row = np.empty(na, dtype=D.dtype)
    ix = np.empty(na, dtype=np.int64)
    for a in range(na):
        _seed(D[a], a, i0 + a, i0, row, ix, bd, bi, count, keep, thr)


@numba.njit(nogil=True, cache=True)
def scan(D: np.ndarray, i0: int, j0: int, diagonal: bool, bd: np.ndarray, bi: np.ndarray, count: np.ndarray,
          keep: int, thr: np.ndarray) -> None:  # pragma: no cover - numba
    """Offer block ``D`` (rows ``i0 + a``, columns ``j0 + b``) to the candidate buffers of its rows and columns.

    A diagonal block (``diagonal``) whose cells have no candidates yet seeds each cell's buffer
    from its whole row (:func:`_seed`); otherwise it offers only pairs ``b > a`` (each pair once,
    no cell with itself).
    """
    na, nb = D.shape
    if diagonal and not count[i0:i0 + na].any():
        _seed_block(D, i0, bd, bi, count, keep, thr)
        return
    tc = thr[j0:j0 + nb]
    pos = np.empty(nb, dtype=np.int64)
    for a in range(na):
        thr[i0 + a] = _offer_row(D[a], a + 1 if diagonal else 0, i0 + a, j0, tc, bd, bi, count, keep, pos, thr[i0 + a])


@numba.njit(nogil=True, cache=True)
def scan_int(P1: np.ndarray, P2: np.ndarray, Q: np.ndarray, i0: int, j0: int, diagonal: bool, bd: np.ndarray,
              bi: np.ndarray, count: np.ndarray, keep: int, thr: np.ndarray) -> None:  # pragma: no cover - numba
    """:func:`scan` of the integer products: ``D = Q_i + Q_j - 2 (2^16 P1 + 2^8 P2)``, in exact integers."""
    na, nb = P1.shape
    tc = thr[j0:j0 + nb]
    qj = Q[j0:j0 + nb]
    pos = np.empty(nb, dtype=np.int64)
    row = np.empty(nb, dtype=np.int64)
    seed = diagonal and not count[i0:i0 + na].any()
    scratch = np.empty(nb if seed else 0, dtype=np.int64)
    ix = np.empty(nb if seed else 0, dtype=np.int64)
    for a in range(na):
        qa = Q[i0 + a]
        for b in range(nb):
            row[b] = qa + qj[b] - 131072 * np.int64(P1[a, b]) - 512 * np.int64(P2[a, b])
        if seed:
            _seed(row, a, i0 + a, j0, scratch, ix, bd, bi, count, keep, thr)
        else:
            thr[i0 + a] = _offer_row(row, a + 1 if diagonal else 0, i0 + a, j0, tc, bd, bi, count, keep, pos, thr[i0 + a])


def block_pairs(n: int, block: int) -> Iterator[tuple[int, int]]:
    """Block pairs ``(i0, j0)``, ``i0 <= j0``: the diagonal ones first, then row by row.

    A diagonal block fills each of its cells' buffers with its best ``keep`` of ``block - 1`` by one
    selection (:func:`_seed`), so every threshold is set before the first off-diagonal block (the
    first block row otherwise offers every value, one push each).
    """
    yield from ((i0, i0) for i0 in range(0, n, block))
    yield from ((i0, j0) for i0 in range(0, n, block) for j0 in range(i0 + block, n, block))


def rounds(n: int, block: int) -> list[list[tuple[int, int]]]:
    """The block pairs in rounds of pairwise disjoint blocks (the diagonal, then a round-robin schedule).

    No cell is in two pairs of a round, so a round's pairs may update candidate lists concurrently.
    """
    starts = list(range(0, n, block))
    rounds = [[(i0, i0) for i0 in starts]]
    ring: list[int | None] = [*starts, None] if len(starts) % 2 else list(starts)  # None: a bye
    for _ in range(len(ring) - 1):
        half = len(ring) // 2
        pairs = [(ring[k], ring[-1 - k]) for k in range(half)]
        rounds.append([(min(x, y), max(x, y)) for x, y in pairs if x is not None and y is not None])
        ring = [ring[0], ring[-1], *ring[1:-1]]  # the circle method: fix one, rotate the others
    return rounds


def sweep(n: int, block: int, threads: int, work: Callable[[int, int, int], None]) -> None:
    """Call ``work(i0, j0, slot)`` on every block pair, on ``threads`` threads (``slot``: the thread's number).

    On one thread the pairs come row by row (a row block's lists stay in cache); on several, in
    rounds of disjoint pairs (:func:`rounds`), so no two threads touch one cell's list. The lists
    found are the same either way (the exact ``K`` nearest do not depend on the order).
    """
    if threads <= 1:
        for i0, j0 in block_pairs(n, block):
            work(i0, j0, 0)
        return
    from concurrent.futures import ThreadPoolExecutor

    def part(slot: int, pairs: list[tuple[int, int]]) -> None:
        for i0, j0 in pairs:
            work(i0, j0, slot)

    with ThreadPoolExecutor(threads) as ex:
        for rnd in rounds(n, block):
            list(ex.map(part, range(threads), [rnd[t::threads] for t in range(threads)]))


@numba.njit(nogil=True, cache=True)
def finish(bd: np.ndarray, bi: np.ndarray, count: np.ndarray, keep: int) -> np.ndarray:  # pragma: no cover - numba
    """Reduce every buffer to its ``keep`` best; returns each cell's last (largest) kept value (float64)."""
    last = np.empty(bd.shape[0])
    for r in range(bd.shape[0]):
        if count[r] > keep:
            select(bd[r, :count[r]], bi[r, :count[r]], keep)
        last[r] = bd[r, :keep].max()
    return last


def buffers(n: int, keep: int, dtype: type) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Candidate buffers of ``2 keep`` values and indices per cell, their fill counts and thresholds."""
    top = np.inf if np.issubdtype(dtype, np.floating) else np.iinfo(dtype).max
    return (np.full((n, 2 * keep), top, dtype=dtype), np.full((n, 2 * keep), -1, dtype=np.int64),
            np.zeros(n, dtype=np.int64), np.full(n, top, dtype=dtype))


def blas_threads() -> int:
    """The BLAS threads in force: the caller's CPU budget (``threadpool_limits``), 1 when unknown."""
    from threadpoolctl import threadpool_info

    blas = [i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"]
    return max(1, min(blas)) if blas else 1
