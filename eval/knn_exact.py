"""Exact nearest neighbours of every cell by blocked matrix products (a flat search, as FAISS's).

The distance matrix is symmetric, so only block pairs ``I <= J`` are formed (the diagonal blocks
first: they set every cell's threshold at once), half the products of a plain search, each pair
offering its values to the ``K + margin`` candidates of the rows of ``I`` and of ``J``
(:mod:`sclstore.eval.knn_blocks`: candidate buffers, block scans, and rounds of disjoint block
pairs for several threads).

Two kinds of products, the same result:

* ``int8`` (where it is exact and faster: CPUs with AMX): the centred cells on a 16-bit grid, split
  into two int8 limbs, give exact integer squared distances of the grid points from two int8
  matrix products (torch's ``_int_mm``, int32 sums) -- no rounding at all; the grid's error per cell
  is known exactly (:func:`_candidates_int8`).
* ``float32``: one float32 product of augmented rows ``[x, |x|^2, 1] . [-2y, 1, |y|^2]``, with
  Higham's rounding bound (:func:`_rounding_bound`).

The candidates are then re-measured in float64 (direct differences of the float32 input, as an
exact search measures them) and sorted. A cell's list is provably its exact ``K`` nearest when its
``K``-th re-measured distance lies below the lower bound, from the products, on the distance of
every cell outside its candidates; any other cell is searched again in float64 against all cells.
So the result is the exact search's, ties aside, at the cost of ~half a brute-force product,
whatever the data's structure. At 100,000 cells x 512 dims on one CPU of this VM (AMX): ~33 s
with int8 products, ~43 s with float32 ones (60-72 s before the candidate buffers), against
~270 s for scikit-learn's brute force (extrapolated from 20,000 cells); pynndescent's
approximate graph took 75-90 s on the benchmark's noisiest layer (recall 0.52) (``bench/eval_scale.py``
E8; BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import numba
import numpy as np

from sclstore.eval import knn_blocks as blocks
from sclstore.store.errors import InvalidInputError

__all__ = ["BLOCK", "MARGIN", "exact_neighbours"]

logger = logging.getLogger(__name__)

#: Cells per block: a 512 x 512 float32 block of distances (1 MiB) stays in a core's L2 cache.
BLOCK = 512
#: Extra float32 candidates per cell, so that rounding cannot hide one of the ``K`` nearest.
MARGIN = 16

_U32 = float(np.finfo(np.float32).eps) / 2  # unit roundoff of float32
#: Largest grid coordinate: ``256 a + b`` with both limbs in ``[-128, 127]`` (``a = floor((q + 128) / 256)``).
_QMAX = 32639
#: int8 products sum ``2 dim`` terms of up to ``2^14`` in int32.
_INT8_MAX_DIM = 65535
#: Cells centred at a time (bounded temporary memory).
_CHUNK = 65536


@numba.njit(nogil=True, cache=True, fastmath={"reassoc"})
def _remeasure(X: np.ndarray, rows: np.ndarray, idx: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - numba
    """Float64 squared distances of ``X[rows[r]]`` to ``X[idx[r, k]]`` (direct differences).

    The sum is reassociated (vectorised); its rounding, ~1e-16 relative, is far below float32's.
    """
    d = X.shape[1]
    for r in range(rows.shape[0]):
        xi = X[rows[r]]
        for k in range(idx.shape[1]):
            xj = X[idx[r, k]]
            s = 0.0
            for c in range(d):
                t = np.float64(xi[c]) - np.float64(xj[c])
                s += t * t
            out[r, k] = s


def _rounding_bound(sq: np.ndarray, dim: int) -> np.ndarray:
    """Per cell ``i``, a bound on ``|float32 distance - exact distance|`` to any other cell.

    The product of two augmented rows of length ``m = dim + 2`` errs by at most
    ``gamma_m * sum|a_k b_k| <= gamma_m * 2 (|x|^2 + |y|^2)`` whatever the summation order
    (Higham, *Accuracy and Stability*, eq. 3.5); rounding the centred data and the squared norms to
    float32 adds at most ``5u (|x|^2 + |y|^2)``. ``|y|^2`` is bounded by the largest norm.
    """
    m = dim + 2
    gamma = m * _U32 / (1 - m * _U32)
    return (2 * gamma + 6 * _U32) * (sq + sq.max()) * (1 + 1e-6)


def _candidates_float32(X: np.ndarray, Kc: int, block: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's ``Kc`` nearest by float32 products, and a lower bound on its squared distance to any other cell."""
    from threadpoolctl import threadpool_limits

    n, dim = X.shape
    mean = X.mean(axis=0, dtype=np.float64)
    Xc = np.empty_like(X)
    sq = np.empty(n)
    for c0 in range(0, n, _CHUNK):  # centred in float64, rounded once to float32 (bounded memory)
        centred = X[c0:c0 + _CHUNK] - mean
        sq[c0:c0 + _CHUNK] = np.einsum("ij,ij->i", centred, centred)
        Xc[c0:c0 + _CHUNK] = centred
    del centred
    left = np.hstack([Xc, sq.astype(np.float32)[:, None], np.ones((n, 1), np.float32)])
    right = np.hstack([-2 * Xc, np.ones((n, 1), np.float32), sq.astype(np.float32)[:, None]])
    del Xc
    bd, bi, count, thr = blocks.buffers(n, Kc, np.float32)

    def work(i0: int, j0: int, slot: int) -> None:
        blocks.scan(left[i0:i0 + block] @ right[j0:j0 + block].T, i0, j0, i0 == j0, bd, bi, count, Kc, thr)

    with threadpool_limits(limits=1) if threads > 1 else contextlib.nullcontext():  # one BLAS thread per thread
        blocks.sweep(n, block, threads, work)
    last = blocks.finish(bd, bi, count, Kc)
    # every cell outside the candidates is at least (last float32 candidate - rounding bound) away
    return bi[:, :Kc], last - _rounding_bound(sq, dim)


def _quantised(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float, np.ndarray]:
    """Centred cells on a 16-bit grid, split into int8 limbs: ``round((x - mean) / s) = 256 a + b``.

    Returns ``(a, b, Q, b_norm, s, e)``: the limbs, ``Q = |q|^2`` (int64, exact), ``|b|``, the grid
    step, and each cell's distance to its grid point ``e = |x - mean - s q|`` (float64).
    """
    n, dim = X.shape
    mean = X.mean(axis=0, dtype=np.float64)
    top = max(float(np.abs(X.max(axis=0) - mean).max()), float(np.abs(X.min(axis=0) - mean).max()))
    s = top / _QMAX * (1 + 1e-9) if top > 0 else 1.0  # so that |q| <= _QMAX
    a = np.empty((n, dim), np.int8)
    b = np.empty((n, dim), np.int8)
    Q = np.empty(n, np.int64)
    b_norm = np.empty(n)
    e = np.empty(n)
    _quantise_rows(X, mean, s, a, b, Q, b_norm, e)
    return a, b, Q, b_norm, s, e


@numba.njit(nogil=True, cache=True)
def _quantise_rows(X: np.ndarray, mean: np.ndarray, s: float, a: np.ndarray, b: np.ndarray, Q: np.ndarray,
                   b_norm: np.ndarray, e: np.ndarray) -> None:  # pragma: no cover - numba
    """Fill :func:`_quantised`'s outputs, one cell at a time."""
    for i in range(X.shape[0]):
        qq = 0
        bb = 0
        ee = 0.0
        for c in range(X.shape[1]):
            y = np.float64(X[i, c]) - mean[c]
            q = np.rint(y / s)
            ee += (y - s * q) ** 2
            qi = np.int64(q)
            hi = (qi + 128) >> 8  # floor: |q| <= _QMAX keeps both limbs in [-128, 127]
            lo = qi - 256 * hi
            a[i, c] = hi
            b[i, c] = lo
            qq += qi * qi
            bb += lo * lo
        Q[i] = qq
        b_norm[i] = np.sqrt(np.float64(bb))
        e[i] = np.sqrt(ee)


def _candidates_int8(X: np.ndarray, Kc: int, block: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's ``Kc`` nearest by exact integer products of the quantised cells, and a lower bound.

    With ``q = 256 a + b``, the products give ``G = 2^16 a.a' + 2^8 (a.b' + b.a')`` exactly (int8
    inputs, int32 sums), so ``D = |q|^2 + |q'|^2 - 2G`` equals ``|q - q'|^2 + 2 b.b'``, the last
    term at most ``2|b||b'|``. A cell outside a list has ``D`` at least the list's last, so
    ``|q - q'| >= sqrt(last - 2|b| max|b'|)``, and its distance at least ``s`` times that minus both
    cells' distances to their grid points (the triangle inequality). No rounding enters: the bound
    is exact arithmetic on the quantised data.
    """
    import torch

    n = X.shape[0]
    a, b, Q, b_norm, s, e = _quantised(X)
    A = torch.from_numpy(a)
    left = torch.from_numpy(np.hstack([a, b]))
    right = torch.from_numpy(np.hstack([b, a]))
    del b
    bd, bi, count, thr = blocks.buffers(n, Kc, np.int64)
    last0 = (n - 1) // block * block
    checked = {(0, 0), (0, last0)}  # a full block and the last, ragged one
    out: list[dict[tuple[int, int], tuple[Any, Any]]] = [{} for _ in range(max(1, threads))]

    def work(i0: int, j0: int, slot: int) -> None:
        shape = (min(block, n - i0), min(block, n - j0))
        if shape not in out[slot]:  # output blocks reused (int_mm writes only whole, contiguous ones)
            out[slot][shape] = torch.empty(shape, dtype=torch.int32), torch.empty(shape, dtype=torch.int32)
        o1, o2 = out[slot][shape]
        torch._int_mm(A[i0:i0 + block], A[j0:j0 + block].T, out=o1)
        torch._int_mm(left[i0:i0 + block], right[j0:j0 + block].T, out=o2)
        if (i0, j0) in checked:
            _check_products(o1.numpy(), a[i0:i0 + block], a[j0:j0 + block])
            _check_products(o2.numpy(), left.numpy()[i0:i0 + block], right.numpy()[j0:j0 + block])
        blocks.scan_int(o1.numpy(), o2.numpy(), Q, i0, j0, i0 == j0, bd, bi, count, Kc, thr)

    with _torch_threads(torch, 1 if threads > 1 else blocks.blas_threads()):  # one torch thread per thread
        blocks.sweep(n, block, threads, work)
    grid = blocks.finish(bd, bi, count, Kc) - 2 * b_norm * b_norm.max()
    # the 1e-12 terms cover float64 rounding of s*sqrt(.) and of e (|error| < 1e-13 max|x - mean|)
    lower = s * np.sqrt(np.maximum(grid, 0.0)) * (1 - 1e-12) - e - e.max() - 1e-12 * s * np.sqrt(Q.astype(np.float64) + Q.max())
    # 1e-9: the re-measured float64 distances err by at most gamma_dim (< 1e-11 for dim <= 65535)
    return bi[:, :Kc], np.where(lower > 0, lower * lower * (1 - 1e-9), 0.0)


class _InexactProducts(Exception):
    """torch's int8 products differ from exact integer arithmetic on this CPU."""


def _check_products(got: np.ndarray, left: np.ndarray, right: np.ndarray) -> None:
    """Raise :class:`_InexactProducts` unless ``got == left @ right.T`` (float64 products: exact below 2^53)."""
    if not np.array_equal(got, left.astype(np.float64) @ right.astype(np.float64).T):
        raise _InexactProducts


@contextlib.contextmanager
def _torch_threads(torch: Any, threads: int) -> Iterator[None]:
    """torch's intra-op threads set to ``threads``, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _has_int_mm() -> bool:
    """Whether torch imports and has ``_int_mm``."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return hasattr(torch, "_int_mm")


@functools.cache
def _int8_products_pay(dim: int) -> bool:
    """Whether exact int8 products (torch's ``_int_mm``) are exact here and faster than float32's at ``dim``.

    Exactness is checked on inputs that saturate 16-bit pair sums (as some int8 kernels without
    VNNI or AMX do); speed by timing one block pair of each search at the search's own width, on
    one thread, alternately, comparing medians. The ratio depends on the width: with AMX int8
    takes ~0.55x float32's time at 512 dims, ~0.75x at 256 and loses at 64 (its int32 outputs
    cost the same at any width), so a decision timed at another width, or on single best-of
    timings on a busy machine, flips. Either way the neighbours are the same: only the time differs.
    """
    if not _has_int_mm():
        return False
    import torch

    try:
        rng = np.random.default_rng(0)
        a = rng.integers(-128, 128, (BLOCK, 512), dtype=np.int8)
        a[:64] = 127
        a[64:128] = -128
        b = a[::-1].copy()
        try:
            _check_products(torch._int_mm(torch.from_numpy(a), torch.from_numpy(b).T).numpy(), a, b)
        except _InexactProducts:
            logger.info("exact kNN: int8 products are not exact on this CPU; using float32 products")
            return False
        from threadpoolctl import threadpool_limits

        # the int8 search's two products (lengths dim and 2 dim) against the float32 one (dim + 2)
        limb = torch.from_numpy(rng.integers(-128, 128, (2, BLOCK, dim), dtype=np.int8))
        pair = torch.from_numpy(rng.integers(-128, 128, (2, BLOCK, 2 * dim), dtype=np.int8))
        x, y = rng.standard_normal((2, BLOCK, dim + 2)).astype(np.float32)
        with _torch_threads(torch, 1), threadpool_limits(limits=1):
            int8, f32 = _medians(lambda: (torch._int_mm(limb[0], limb[1].T), torch._int_mm(pair[0], pair[1].T)), lambda: x @ y.T)
        logger.debug("exact kNN: one block pair of products at %d dims, int8 %.3f ms, float32 %.3f ms", dim, int8 * 1e3, f32 * 1e3)
        return int8 < 0.8 * f32
    except RuntimeError:  # no int8 kernel for this CPU
        return False


def _timed_width(dim: int) -> int:
    """The width the product choice is timed at: ``dim`` rounded up to 64 (one timing per 64 widths,
    each cached for the process), at most 4,096 (the timing's int8 matrices are ``BLOCK x 2 x width``)."""
    return min(4096, -(-dim // 64) * 64)


def _medians(f: Callable[[], object], g: Callable[[], object], repeats: int = 15) -> tuple[float, float]:
    """Median seconds of ``f`` and of ``g``, run alternately after a warm-up (a busy machine slows both alike)."""
    f(), g()
    tf, tg = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        tf.append(time.perf_counter() - t)
        t = time.perf_counter()
        g()
        tg.append(time.perf_counter() - t)
    return float(np.median(tf)), float(np.median(tg))


def exact_neighbours(X: np.ndarray, K: int, *, block: int = BLOCK, margin: int = MARGIN,
                     products: str = "auto", threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``K`` nearest other cells of every cell, exactly (Euclidean), by blocked products.

    Parameters
    ----------
    X
        Representation, cells x dim (float32 is used; distances are measured from it).
    K
        Neighbours per cell, the cell itself excluded (``1 <= K < n``).
    block
        Cells per block of the products.
    margin
        Extra candidates per cell kept from the products.
    products
        ``float32``, ``int8`` (exact integer products of the cells on a 16-bit grid), or ``auto``:
        int8 where it is exact and faster on this CPU. The result is the same.
    threads
        CPU threads (``None``: the BLAS threads in force, i.e. the caller's budget). The result does
        not depend on it.

    Returns
    -------
    tuple of numpy.ndarray
        ``(indices, distances)``, ``(n, K)`` int64 and float32, nearest first (ties by index).
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    n, dim = X.shape
    if not 1 <= K < n:
        raise InvalidInputError(f"neighbour list length must be between 1 and n_cells - 1 = {n - 1}, got {K}")
    if not np.isfinite(X).all():
        raise InvalidInputError("representation has non-finite values; drop or impute those cells before the kNN graph")
    if products not in ("auto", "float32", "int8"):
        raise InvalidInputError(f"products must be auto, float32 or int8, got {products!r}")
    if products == "auto":
        products = "int8" if dim <= _INT8_MAX_DIM and _int8_products_pay(_timed_width(dim)) else "float32"
    if products == "int8" and dim > _INT8_MAX_DIM:
        raise InvalidInputError(f"int8 products sum {2 * dim} terms of up to 2^14, beyond int32; use float32 above {_INT8_MAX_DIM} dims")
    if products == "int8" and not _has_int_mm():
        raise InvalidInputError("int8 products need torch's _int_mm, which this torch lacks; use products='float32' or 'auto'")
    Kc = min(n - 1, K + margin)
    threads = blocks.blas_threads() if threads is None else max(1, int(threads))
    try:
        hi, lower = (_candidates_int8 if products == "int8" else _candidates_float32)(X, Kc, block, threads)
    except _InexactProducts:  # checked on real blocks: a kernel that saturates or rounds is never trusted
        logger.warning("exact kNN: int8 products are not exact on this CPU; searching with float32 products")
        hi, lower = _candidates_float32(X, Kc, block, threads)
    cand_d = np.empty((n, Kc))
    _remeasure(X, np.arange(n), hi, cand_d)
    order = np.lexsort((hi, cand_d), axis=1)  # by distance, ties by index
    cand_i = np.take_along_axis(hi, order, axis=1)
    cand_d = np.take_along_axis(cand_d, order, axis=1)
    # proven: every cell outside the candidates is at least ``lower`` away
    unproven = np.flatnonzero((Kc < n - 1) & ~(cand_d[:, K - 1] < lower))
    if unproven.size:
        logger.debug("exact kNN: %d of %d cells searched again in float64 (rounding bound above their margin)", unproven.size, n)
        _search_again(X, unproven, K, cand_i, cand_d)
    return cand_i[:, :K].copy(), np.sqrt(cand_d[:, :K]).astype(np.float32)


def _search_again(X: np.ndarray, rows: np.ndarray, K: int, cand_i: np.ndarray, cand_d: np.ndarray) -> None:
    """Float64 distances of ``rows`` to every cell; their first ``K`` candidates replaced in place."""
    n = X.shape[0]
    everyone = np.arange(n, dtype=np.int64)[None, :]
    d = np.empty((1, n))
    for r in rows:
        _remeasure(X, np.array([r]), everyone, d)
        d[0, r] = np.inf
        top = np.argpartition(d[0], K)[:K + 1] if n > K + 1 else np.arange(n)
        top = top[np.lexsort((top, d[0, top]))][:K]
        cand_i[r, :K] = top
        cand_d[r, :K] = d[0, top]
