"""Perceptual fingerprints of images, and the search for near-duplicates among them.

Public chest X-ray collections hold one radiograph several times: rotated by 90/180/270
degrees, mirrored, rescaled, re-encoded as JPEG, padded, or filed under a second patient. An
exact pixel hash sees none of these; this fingerprint sees all of them.

The fingerprint (our own, over the pixels indexing already decodes; no extra decode, and the
orientation trick below needs the transform's structure, which imagehash does not expose):

1. grey levels (the mean of RGB), with constant borders trimmed (padding is exact-valued, so a
   row or column whose standard deviation is under 1.5 grey levels is border, not anatomy);
2. an exact area-average to 32 x 32 (a resampling matrix, symmetric under mirroring: PIL's
   box filter at fractional ratios is not, which broke rotation invariance by up to 7 bits);
3. the 2-D DCT-II; the signs of the 11 x 11 lowest-frequency coefficients but the DC term:
   120 bits. A sign is unchanged by brightness and (unclipped) contrast changes, and by the
   smoothing of rescaling and JPEG.

Invariance to the 8 rotations and mirrorings is exact and costs nothing at hashing time:
mirroring an image left-right multiplies DCT coefficient (u, v) by (-1)^v, top-bottom by
(-1)^u, and transposing it transposes the coefficients. So the fingerprint of every orientation
of an image is a fixed bit permutation and a fixed XOR mask of its fingerprint, and the search
compares each image's 8 orientations against the others.

Search (``near_duplicate_pairs``) is multi-index hashing (Norouzi, Punjani & Fleet, CVPR 2012):
with the bits dealt into ``max_distance + 1`` chunks, two fingerprints within ``max_distance``
agree exactly on at least one chunk (pigeonhole), so only pairs sharing a chunk value, found by a
sorted join, are compared in full. Exact: it finds every pair brute force finds. Chunks are dealt
so that each mixes well-balanced and skewed bits (radiographs share their lowest frequencies).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pandas as pd
from scipy.fft import dctn
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

SIDE = 32
BLOCK = 11
BITS = BLOCK * BLOCK - 1  # the DC term's sign says nothing
HEX_CHARS = (BITS + 3) // 4
BORDER_STD = 1.5  # grey levels: a padded row or column is flat
# the 8 orientations: (transpose first, then mirror left-right, then flip top-bottom)
ORIENTATIONS = {
    (False, False, False): "same orientation",
    (False, True, False): "mirrored left-right",
    (False, False, True): "flipped top-bottom",
    (False, True, True): "rotated 180°",
    (True, False, False): "transposed",
    (True, False, True): "rotated 90° anticlockwise",
    (True, True, False): "rotated 90° clockwise",
    (True, True, True): "anti-transposed",
}
ORIENTATION_NAMES = list(ORIENTATIONS.values())


@lru_cache(maxsize=256)
def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights averaging each output cell's exact share of the input pixels."""
    edges = np.linspace(0.0, n_in, n_out + 1)
    lo = np.arange(n_in, dtype=np.float64)
    overlap = np.minimum(lo[None, :] + 1, edges[1:, None]) - np.maximum(lo[None, :], edges[:-1, None])
    weights = np.clip(overlap, 0.0, None)
    return weights / weights.sum(1, keepdims=True)


@lru_cache(maxsize=256)
def _area_matrix32(n_in: int, n_out: int) -> np.ndarray:
    return _area_matrix(n_in, n_out).astype(np.float32)


def _trim_borders(grey: np.ndarray) -> np.ndarray:
    """``grey`` less its flat border rows and columns: from the first to the last row (column)
    whose range and standard deviation both exceed BORDER_STD, when at least 8 rows (columns) do;
    else ``grey`` as it is."""
    rows = _kept_span(grey, 1)
    cols = _kept_span(grey, 0)
    if rows is None or cols is None:  # a flat image: nothing to trim towards
        return grey
    return grey[rows[0] : rows[1] + 1, cols[0] : cols[1] + 1]


def _flat(lines: np.ndarray, axis: int) -> np.ndarray:
    """Which lines are flat: range and standard deviation (float32, numpy's own two-pass std, the
    same operations spelled out: its Python layers cost more than the arithmetic on 8 lines)."""
    n = np.intp(lines.shape[axis])
    spread = np.maximum.reduce(lines, axis) - np.minimum.reduce(lines, axis)
    mean = np.add.reduce(lines, axis, keepdims=True)
    np.true_divide(mean, n, out=mean, casting="unsafe")
    deviation = np.subtract(lines, mean)
    np.square(deviation, out=deviation)
    var = np.add.reduce(deviation, axis)
    np.true_divide(var, n, out=var, casting="unsafe")
    # a border line is flat: its range is a cheap first test, the standard deviation decides
    return ~((spread > BORDER_STD) & (np.sqrt(var) > BORDER_STD))


def _kept_span(grey: np.ndarray, axis: int) -> tuple[int, int] | None:
    """(first, last) line along ``axis`` (1: rows, 0: columns) that is not flat, or None when
    fewer than 8 are. Lines are tested in chunks from each edge inwards, 8 lines first and twice
    as many each time (a radiograph's edge line is rarely flat: it costs 8 lines a side, a wide
    padding a few more chunks), so not the whole image. A line's result does not depend on its
    chunk: numpy reduces each row, and each column, in the same order whatever the slice."""
    n = grey.shape[0] if axis == 1 else grey.shape[1]

    def not_flat(start: int, stop: int) -> np.ndarray:  # indices from ``start`` of the lines that are not flat
        lines = grey[start:stop] if axis == 1 else grey[:, start:stop]
        return np.flatnonzero(~_flat(lines, axis))

    first, at, chunk, count = None, 0, 8, 0
    while first is None and at < n:  # the first line that is not flat
        found = not_flat(at, min(n, at + chunk))
        first, count = (at + int(found[0]), len(found)) if len(found) else (None, 0)
        at, chunk = at + chunk, min(2 * chunk, 256)
    if first is None:
        return None
    last, stop, chunk = None, n, 8
    while last is None:  # the last one (line ``first`` is not flat: this ends)
        start = max(first, stop - chunk)
        found = not_flat(start, stop)
        last = start + int(found[-1]) if len(found) else None
        stop, chunk = start, min(2 * chunk, 256)
    # at least 8 lines that are not flat: the first chunk's, then further ones up to the last line
    if at > last:  # that chunk held the last line too: count only up to it
        count = len(not_flat(first, last + 1))
    while count < 8 and at <= last:
        count += len(not_flat(at, min(last + 1, at + 32)))
        at += 32
    return (first, last) if count >= 8 else None


def grey_plane(pixels: np.ndarray) -> np.ndarray:
    """``pixels`` as one grey plane (H, W) when they are grey: stored so, or as RGB with three
    equal channels (most JPEG exports of films); colour pixels as they are."""
    if pixels.ndim == 3:
        r, g, b = (np.ascontiguousarray(pixels[..., c]) for c in range(3))  # contiguous: compared at memory speed
        if np.array_equal(r, g) and np.array_equal(r, b):
            return r
    return pixels


def trimmed_grey(pixels: np.ndarray) -> np.ndarray:
    """Grey levels (float32, the mean of RGB) with flat borders trimmed: what every signature of
    an image (this fingerprint, medfold.data.matching's descriptor and thumbnail) starts from."""
    pixels = grey_plane(pixels)
    if pixels.ndim == 3:  # the same float32 value as the mean of the three: an exact sum, then one division
        r, g, b = (np.ascontiguousarray(pixels[..., c]) for c in range(3))
        grey = (r.astype(np.uint16) + g + b).astype(np.float32) / np.float32(3)
    else:
        grey = pixels.astype(np.float32)
    return _trim_borders(grey)


def area_average(grey: np.ndarray, side: int = SIDE) -> np.ndarray:
    """The exact area average of ``grey`` to ``side`` x ``side`` (float64)."""
    # float32 for the large product (the side x W one first), float64 for the small one
    narrow = _area_matrix32(grey.shape[0], side) @ grey
    return narrow.astype(np.float64) @ _area_matrix(grey.shape[1], side).T


def _bits(pixels: np.ndarray, small: np.ndarray | None = None) -> np.ndarray:
    small = area_average(trimmed_grey(pixels)) if small is None else small
    block = dctn(small, norm="ortho")[:BLOCK, :BLOCK]
    return (block.ravel()[1:] > 0).astype(np.uint8)


def fingerprint(pixels: np.ndarray, small: np.ndarray | None = None) -> str:
    """The 120-bit fingerprint of a uint8 image (H, W) or (H, W, 3), as 30 hex digits
    (``small``: its ``area_average(trimmed_grey(pixels))`` when the caller has it already)."""
    return bits_to_hex(_bits(pixels, small)[None])[0]


def bits_to_hex(bits: np.ndarray) -> list[str]:
    """(N, 120) 0/1 rows to hex strings, most significant bit first (120 bits: 30 hex digits)."""
    packed = np.packbits(bits.astype(np.uint8), axis=1)
    return [row.tobytes().hex()[:HEX_CHARS] for row in packed]


def hex_to_bits(fingerprints) -> np.ndarray:
    """Hex strings to an (N, 120) uint8 0/1 matrix."""
    raw = np.frombuffer(b"".join(bytes.fromhex(f) for f in fingerprints), np.uint8)
    return np.unpackbits(raw.reshape(len(fingerprints), -1), axis=1)[:, :BITS]


@lru_cache(maxsize=4)
def orientation_maps(block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """(8, block² - 1) source positions and sign masks: orientation g of a fingerprint ``b`` (the
    DCT block's coefficients but DC, row by row) is ``b[perm[g]] ^ mask[g]``; of a vector of the
    coefficients themselves, ``c[perm[g]] * (1 - 2 * mask[g])``."""
    u, v = np.divmod(np.arange(block * block), block)
    perms, masks = [], []
    for transpose, mirror, flip in ORIENTATIONS:
        source = (v * block + u) if transpose else np.arange(block * block)
        sign = (v * mirror + u * flip) % 2
        perms.append(source[1:] - 1)  # DC (position 0) maps to itself and is not stored
        masks.append(sign[1:].astype(np.uint8))
    return np.array(perms), np.array(masks)


def oriented(bits: np.ndarray, g: int) -> np.ndarray:
    perm, mask = orientation_maps()
    return bits[:, perm[g]] ^ mask[g]


def _words(bits: np.ndarray) -> np.ndarray:
    """(N, 120) bits to (N, 2) uint64 for popcounts."""
    packed = np.packbits(bits, axis=1)
    packed = np.pad(packed, ((0, 0), (0, 16 - packed.shape[1])))
    return np.ascontiguousarray(packed).view(np.uint64)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(a ^ b).sum(-1).astype(np.int64)


def distance(a: str, b: str) -> tuple[int, str]:
    """The smallest distance between ``b`` and any orientation of ``a``, and that orientation."""
    bits_a, bits_b = hex_to_bits([a]), _words(hex_to_bits([b]))
    d = [int(hamming(_words(oriented(bits_a, g)), bits_b)[0]) for g in range(8)]
    g = int(np.argmin(d))
    return d[g], ORIENTATION_NAMES[g]


def _chunks(bits: np.ndarray, count: int) -> list[np.ndarray]:
    """Bit positions dealt into ``count`` chunks, from the most to the least balanced bit, so that
    every chunk carries a similar share of the information."""
    balance = np.abs(bits.mean(0) - 0.5) if len(bits) else np.zeros(bits.shape[1])
    order = np.argsort(balance, kind="stable")
    return [np.sort(order[i::count]) for i in range(count)]


def _keys(bits: np.ndarray, positions: np.ndarray) -> np.ndarray:
    return bits[:, positions].astype(np.int64) @ (np.int64(1) << np.arange(len(positions), dtype=np.int64))


def near_duplicate_pairs(bits: np.ndarray, max_distance: int) -> pd.DataFrame:
    """Every pair (a < b) of rows of ``bits`` (N, 120) within ``max_distance`` in some
    orientation: columns a, b, distance, orientation (the index into ORIENTATION_NAMES of the
    transform taking a to b, at its smallest distance)."""
    n = len(bits)
    words = _words(bits)
    found: list[pd.DataFrame] = []
    for positions in _chunks(bits, max_distance + 1):
        db = _keys(bits, positions)
        order = np.argsort(db, kind="stable")
        db_sorted = db[order]
        for g in range(8):
            query = oriented(bits, g)
            q = _keys(query, positions)
            lo = np.searchsorted(db_sorted, q, "left")
            counts = np.searchsorted(db_sorted, q, "right") - lo
            total = int(counts.sum())
            if total == 0:
                continue
            a = np.repeat(np.arange(n), counts)
            starts = np.repeat(lo - (np.cumsum(counts) - counts), counts)
            b = order[starts + np.arange(total)]
            keep = a < b  # (b, a) under the inverse orientation is the same pair
            a, b = a[keep], b[keep]
            d = hamming(_words(query)[a], words[b])
            close = d <= max_distance
            if close.any():
                found.append(pd.DataFrame({"a": a[close], "b": b[close], "distance": d[close], "orientation": g}))
    if not found:
        return pd.DataFrame(
            {
                "a": np.zeros(0, np.int64),
                "b": np.zeros(0, np.int64),
                "distance": np.zeros(0, np.int64),
                "orientation": np.zeros(0, np.int64),
            }
        )
    pairs = pd.concat(found, ignore_index=True).sort_values(["a", "b", "distance", "orientation"])
    return pairs.drop_duplicates(["a", "b"]).reset_index(drop=True)


def brute_force_pairs(
    bits: np.ndarray, max_distance: int, rows: np.ndarray | None = None, block: int = 64
) -> pd.DataFrame:
    """The same answer by comparing every pair (rows ``rows``, default all, against all rows),
    vectorised over blocks of rows: the baseline the search is measured against."""
    n = len(bits)
    words = _words(bits)
    oriented_words = np.stack([_words(oriented(bits, g)) for g in range(8)])  # (8, N, 2)
    rows = np.arange(n) if rows is None else np.asarray(rows)
    found = []
    for start in range(0, len(rows), block):
        a = rows[start : start + block]
        d = hamming(oriented_words[:, a, None, :], words[None, None, :, :])  # (8, block, N)
        best = d.argmin(0)
        dist = np.take_along_axis(d, best[None], 0)[0]
        ia, jb = np.nonzero((dist <= max_distance) & (np.arange(n)[None, :] > a[:, None]))
        found.append(pd.DataFrame({"a": a[ia], "b": jb, "distance": dist[ia, jb], "orientation": best[ia, jb]}))
    return pd.concat(found, ignore_index=True) if found else near_duplicate_pairs(bits[:0], max_distance)


def clusters(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected-component number per row (rows in no pair get their own)."""
    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    return connected_components(graph, directed=False)[1]
