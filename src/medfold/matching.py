"""Re-published copies of a radiograph found and verified: a candidate search with high recall,
then a registration of each candidate pair that says whether it is one film.

medfold.fingerprint finds copies whose pixels are only rotated, mirrored, rescaled, re-encoded
or padded: its DCT signs follow the content's position, so a crop of a few percent moves 10-20
of its 120 bits, and on real radiographs distinct patients already lie that close. Real
collections re-publish with crops, shifts, a changed aspect, gamma and contrast, burned-in
text and arrows (measured on the Kermany set: bench/near_duplicates.py --real). So:

1. **Candidates.** A 35-number descriptor per image: the 6 x 6 lowest DCT frequencies (DC
   left out) of a 32 x 32 area average of the image's *moment window* (the intensity centroid
   +- 2 standard deviations per axis: a crop of the film's edge moves it far less than it moves
   the film's edge), after a rank transform (so any monotone change of grey levels - gamma,
   contrast, brightness, equalisation - leaves it unchanged). Its 8 orientations are signed
   permutations of it, as the fingerprint's are. Every image's ``neighbours`` most similar
   images in any orientation are searched with an HNSW graph (faiss; exact search costs
   N^2 x 8: 4-6 minutes at NIH size on 2 cores, the graph about 30 s). The descriptor is
   quantised to integers so that every inner product is exact in float32 (|sum| < 2^24): the
   graph, built in one thread, is the same on every x86-64 host whatever SIMD faiss picks.
2. **Verification.** Both 96 x 96 thumbnails (flat borders trimmed, histogram-equalised), the
   second in the candidate's orientation; a phase-correlation gate on their band-pass content
   (cheap: most look-alikes stop here); then an affine registration (OpenCV's
   ``findTransformECC``, coarse to fine: shift, scale per axis, small rotation, shear) and the
   **score**: the normalised correlation of the two band-pass images (the detail of ribs,
   vessels and edges, not the shared anatomy) over their registered overlap. A re-published
   copy scores 0.88-1.0; distinct children's radiographs of the Kermany set at most about 0.7.

OpenCV (opencv-python-headless) rather than scikit-image: ECC is an affine registration that
maximises a correlation invariant to brightness and contrast, in C++ (about 1 ms a pair at
64 px); scikit-image registers translation only (phase_cross_correlation) or needs a Python
optimiser loop around its warps.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pandas as pd
from scipy.fft import dctn

from . import fingerprint as fp


def _one_thread() -> None:
    """OpenCV in one thread, in every process: its images here are 32-96 px (a pool costs more
    than it gives), indexing's own threads are the parallelism, and a forked verification
    worker must not inherit a thread pool whose threads it does not have."""
    import cv2

    cv2.setNumThreads(1)


_one_thread()

BLOCK = 6
DIMS = BLOCK * BLOCK - 1
SCALE = 127  # integer descriptor: 35 x 127^2 < 2^24, exact in float32
WINDOW_SIGMAS = 2.0
THUMB = 96
REGISTER_SIDE = 64  # the registration's fine level; its coarse level is half that
BAND = (0.75, 2.25)  # the score's band-pass at THUMB px (Gaussian sigmas): detail, not anatomy
MIN_OVERLAP = 0.5


@dataclass(frozen=True)
class Signature:
    """What matching keeps of one image: the candidate descriptor and the verification thumbnail."""

    descriptor: np.ndarray  # int8 (DIMS,)
    thumbnail: np.ndarray  # uint8 (THUMB, THUMB), equalised


def moment_window(grey: np.ndarray) -> np.ndarray:
    """The part of ``grey`` within 2 standard deviations of its intensity centroid, per axis
    (intensity above the 5th percentile: the body, not the background, places it)."""
    # the background level, cheaply: of the 16 x 16 area average (the same in every orientation)
    floor = _fifth_percentile(fp.area_average(grey, 16).ravel())
    weight = np.subtract(grey, floor, dtype=np.float64)
    np.maximum(weight, 0, out=weight)
    total = weight.sum()
    if total <= 0:
        return grey
    bounds = []
    for axis in (1, 0):  # rows' profile, then columns'
        profile = weight.sum(axis) / total
        pos = np.arange(len(profile))
        mean = (profile * pos).sum()
        sd = np.sqrt((profile * (pos - mean) ** 2).sum())
        lo, hi = (
            int(max(0, np.floor(mean - WINDOW_SIGMAS * sd))),
            int(min(len(profile), np.ceil(mean + WINDOW_SIGMAS * sd))),
        )
        bounds.append((lo, hi) if hi - lo >= 8 else (0, len(profile)))
    (r0, r1), (c0, c1) = bounds
    return np.ascontiguousarray(grey[r0:r1, c0:c1])  # a view would make the area average's product slow


def _fifth_percentile(values: np.ndarray) -> float:
    """``np.percentile(values, 5)`` (its default linear method, the same arithmetic) of a flat
    float64 array without NaN: a partition of two ranks instead of its general machinery."""
    virtual = (values.size - 1) * 0.05
    lo = int(np.floor(virtual))
    hi = min(lo + 1, values.size - 1)
    gamma = virtual - lo
    ranked = np.partition(values, (lo, hi))
    a, b = ranked[lo], ranked[hi]
    return b - (b - a) * (1 - gamma) if gamma >= 0.5 else a + (b - a) * gamma


def descriptor(grey: np.ndarray) -> np.ndarray:
    small = fp.area_average(moment_window(grey))
    order = np.argsort(small.ravel(), kind="stable")
    ranks = np.empty(order.size, np.int64)
    ranks[order] = np.arange(order.size)  # the inverse permutation: each value's rank, ties by position
    ranks = ranks.reshape(small.shape)
    block = dctn(ranks.astype(np.float64), norm="ortho")[:BLOCK, :BLOCK].ravel()[1:]
    norm = np.linalg.norm(block)
    return np.round(block / norm * SCALE).astype(np.int8) if norm > 0 else np.zeros(DIMS, np.int8)


def thumbnail(grey: np.ndarray) -> np.ndarray:
    import cv2

    small = cv2.resize(grey, (THUMB, THUMB), interpolation=cv2.INTER_AREA)
    return cv2.equalizeHist(np.clip(np.round(small), 0, 255).astype(np.uint8))


WORKING_SIDE = 256  # larger images are area-averaged to this first: both need far less


def signature(grey: np.ndarray) -> Signature:
    """From ``fingerprint.trimmed_grey(pixels)``. A 1024 px radiograph is first area-averaged
    to WORKING_SIDE (a signature took 13.5 ms, now 7.4 ms, of which the fingerprint 4.7 ms)."""
    import cv2

    if max(grey.shape) > WORKING_SIDE:
        grey = cv2.resize(grey, (WORKING_SIDE, WORKING_SIDE), interpolation=cv2.INTER_AREA)
    return Signature(descriptor(grey), thumbnail(grey))


# ----------------------------------------------------------------------------- orientations
def oriented_descriptors(desc: np.ndarray, g: int) -> np.ndarray:
    """Orientation g (an index into fingerprint.ORIENTATIONS) of (N, DIMS) descriptors, float32."""
    perm, mask = fp.orientation_maps(BLOCK)
    return desc[:, perm[g]].astype(np.float32) * (1.0 - 2.0 * mask[g].astype(np.float32))


def orient_pixels(image: np.ndarray, g: int) -> np.ndarray:
    """Orientation g of an image: transpose first, then mirror left-right, then flip top-bottom,
    as the fingerprint's and the descriptor's orientation g are."""
    transpose, mirror, flip = list(fp.ORIENTATIONS)[g]
    out = image.T if transpose else image
    out = out[:, ::-1] if mirror else out
    out = out[::-1] if flip else out
    return np.ascontiguousarray(out)


@lru_cache(maxsize=1)
def inverse_orientations() -> tuple[int, ...]:
    """inverse[g]: the orientation that undoes g."""
    probe = np.arange(16).reshape(4, 4)
    out = []
    for g in range(8):
        moved = orient_pixels(probe, g)
        out.append(next(h for h in range(8) if np.array_equal(orient_pixels(moved, h), probe)))
    return tuple(out)


# ----------------------------------------------------------------------------- candidates
GROUP_SLACK = 16  # neighbours searched beyond ``neighbours`` so that one's own group can be skipped


def candidate_pairs(
    desc: np.ndarray, neighbours: int, threads: int = 1, groups: np.ndarray | None = None
) -> pd.DataFrame:
    """Each image's ``neighbours`` most similar others in any of the 8 orientations: columns a < b,
    similarity (cosine of the descriptors, best orientation), orientation (taking a to b). With
    ``groups`` (an integer per row), images of the row's own group are skipped and the next ones
    taken (up to GROUP_SLACK of them): a patient's other films are the nearest descriptors of
    each of its films, and would crowd out a copy filed under someone else."""
    import faiss

    n = len(desc)
    empty = pd.DataFrame(
        {"a": np.zeros(0, np.int64), "b": np.zeros(0, np.int64), "similarity": [], "orientation": np.zeros(0, np.int64)}
    )
    if n < 2 or neighbours < 1:
        return empty
    base = desc.astype(np.float32)
    norms = np.maximum(np.linalg.norm(base, axis=1), 1.0)
    k = min(neighbours + 1 + (GROUP_SLACK if groups is not None else 0), n)
    faiss.omp_set_num_threads(1)  # one-threaded insertion: the same graph on every run and host
    index = faiss.IndexHNSWFlat(DIMS, 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 40  # 80 built in twice the time, no copy found more on Kermany
    index.add(base)
    index.hnsw.efSearch = max(64, 3 * k)
    faiss.omp_set_num_threads(max(1, threads))  # queries are independent of each other
    found = []
    for g in range(8):
        query = oriented_descriptors(desc, g)
        _, ids = index.search(query, k)
        a = np.repeat(np.arange(n), k)
        b = ids.ravel().astype(np.int64)
        keep = (b >= 0) & (b != a)
        found.append(pd.DataFrame({"query": a[keep], "b": b[keep], "orientation": g}))
    pairs = pd.concat(found, ignore_index=True)
    if groups is not None:
        pairs = pairs[groups[pairs["query"].to_numpy()] != groups[pairs["b"].to_numpy()]].reset_index(drop=True)
    # exact similarity of each found pair in its orientation (integers: no rounding)
    sims = np.empty(len(pairs), np.float64)
    for g, rows in pairs.groupby("orientation").indices.items():
        oq = oriented_descriptors(desc[pairs["query"].to_numpy()[rows]], g)
        sims[rows] = (oq * base[pairs["b"].to_numpy()[rows]]).sum(1)
    pairs["similarity"] = sims / (norms[pairs["query"].to_numpy()] * norms[pairs["b"].to_numpy()])
    # each image keeps its best orientation per other image, then its `neighbours` best others
    pairs = pairs.sort_values(["query", "similarity", "b", "orientation"], ascending=[True, False, True, True])
    pairs = pairs.drop_duplicates(["query", "b"]).groupby("query", sort=False).head(neighbours)
    # as pairs a < b: the orientation taking a to b (the inverse when b asked)
    inverse = np.array(inverse_orientations())
    swap = pairs["query"].to_numpy() > pairs["b"].to_numpy()
    a = np.where(swap, pairs["b"], pairs["query"])
    b = np.where(swap, pairs["query"], pairs["b"])
    g = np.where(swap, inverse[pairs["orientation"].to_numpy()], pairs["orientation"].to_numpy())
    out = pd.DataFrame({"a": a, "b": b, "similarity": pairs["similarity"].to_numpy(), "orientation": g})
    out = out.sort_values(["a", "b", "similarity", "orientation"], ascending=[True, True, False, True])
    return out.drop_duplicates(["a", "b"]).reset_index(drop=True) if len(out) else empty


# ----------------------------------------------------------------------------- verification
@dataclass(frozen=True)
class Verification:
    """How well two thumbnails match once registered: ``score`` (band-pass correlation over the
    overlap; -1 when they could not be registered or overlap too little), ``coarse`` (the same
    after the coarse level alone: a pair below ``early`` there is not refined), the overlap's
    share of the first image, and the registration (the second image in the first's frame:
    shift as a fraction of the side, scale per axis, rotation in degrees)."""

    score: float
    coarse: float = -1.0
    overlap: float = 0.0
    shift_x: float = 0.0
    shift_y: float = 0.0
    scale_x: float = 1.0
    scale_y: float = 1.0
    rotation: float = 0.0


def _band(image: np.ndarray, sigmas: tuple[float, float]) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(image, (0, 0), sigmas[0]) - cv2.GaussianBlur(image, (0, 0), sigmas[1])


# ECC iterations per level: the coarse level (half of REGISTER_SIDE) finds the warp, the fine
# one polishes it (each iteration costs about 50 us at 32 px and 100 us at 64 px here). 8 at
# the coarse level gave the same scores to 600 Kermany copies as 20, in 0.63 of the time.
COARSE_ITERATIONS = 8
FINE_ITERATIONS = 10


def _ecc(a: np.ndarray, b: np.ndarray, warp: np.ndarray, iterations: int) -> np.ndarray | None:
    import cv2

    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, iterations, 1e-4)
    try:
        return cv2.findTransformECC(a, b, warp.copy(), cv2.MOTION_AFFINE, criteria, None, 3)[1]
    except cv2.error:  # did not converge (flat images, or nothing to align)
        return None


def _at_size(warp: np.ndarray, factor: float) -> np.ndarray:
    """A warp between two images as the warp between them ``factor`` times larger (pixel
    centres: x' = f x + (f - 1) / 2)."""
    out = warp.astype(np.float64).copy()
    out[:, 2] = factor * out[:, 2] + (factor - 1) / 2 * (out[:, 0] + out[:, 1] - 1)
    return out


def _zncc(x: np.ndarray, y: np.ndarray) -> float:
    x = x - x.mean()
    y = y - y.mean()
    denominator = np.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum() / denominator) if denominator > 0 else 0.0


@lru_cache(maxsize=1)
def _inner() -> np.ndarray:
    """The thumbnail less a 3-pixel frame: warped, it marks the overlap (away from its edge)."""
    inner = np.zeros((THUMB, THUMB), np.float32)
    inner[3:-3, 3:-3] = 1
    return inner


def _overlap_score(band_a: np.ndarray, band_b: np.ndarray, warp: np.ndarray) -> tuple[float, float]:
    """Correlation of ``band_a`` and ``band_b`` warped onto it (``warp`` at THUMB px, b's
    coordinates from a's), over their overlap, and that overlap's share of a."""
    import cv2

    size = (THUMB, THUMB)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    moved = cv2.warpAffine(band_b, warp, size, flags=flags)
    valid = cv2.warpAffine(_inner(), warp, size, flags=flags) > 0.999
    overlap = float(valid.mean())
    if overlap < MIN_OVERLAP:
        return -1.0, overlap
    return _zncc(band_a[valid], moved[valid]), overlap


def verify(thumb_a: np.ndarray, thumb_b: np.ndarray, orientation: int, early: float = -1.0) -> Verification:
    """Register ``thumb_b`` (oriented back by ``orientation``, the transform taking a to b) onto
    ``thumb_a`` and score their overlap. A pair scoring below ``early`` after the coarse level
    is not refined: distinct radiographs mostly stop there, their detail lining up nowhere."""
    import cv2

    a = thumb_a.astype(np.float32)
    b = orient_pixels(thumb_b, inverse_orientations()[orientation]).astype(np.float32)
    band_a, band_b = _band(a, BAND), _band(b, BAND)

    def level(side):
        return [
            cv2.GaussianBlur(cv2.resize(x, (side, side), interpolation=cv2.INTER_AREA), (0, 0), 1.0) for x in (a, b)
        ]

    best = Verification(score=-1.0)
    warp = _ecc(*level(REGISTER_SIDE // 2), np.eye(2, 3, dtype=np.float32), COARSE_ITERATIONS)
    if warp is None:
        warp = np.eye(2, 3, dtype=np.float32)
    else:
        best = _verification(band_a, band_b, _at_size(warp, THUMB / (REGISTER_SIDE // 2)), coarse=True)
        if best.score < early:
            return best
    fine = _ecc(*level(REGISTER_SIDE), _at_size(warp, 2.0).astype(np.float32), FINE_ITERATIONS)
    if fine is not None:
        refined = _verification(band_a, band_b, _at_size(fine, THUMB / REGISTER_SIDE), coarse=False)
        if refined.score >= best.score:
            return Verification(**{**refined.__dict__, "coarse": best.score})
    return Verification(**{**best.__dict__, "coarse": best.score})


def _verification(band_a, band_b, warp: np.ndarray, coarse: bool) -> Verification:
    score, overlap = _overlap_score(band_a, band_b, warp)
    (sx, shx, tx), (shy, sy, ty) = warp
    return Verification(
        score=score,
        coarse=score if coarse else -1.0,
        overlap=overlap,
        shift_x=float(tx / THUMB),
        shift_y=float(ty / THUMB),
        scale_x=float(np.hypot(sx, shy)),
        scale_y=float(np.hypot(shx, sy)),
        rotation=float(np.degrees(np.arctan2(shy, sx))),
    )


_FIELDS = tuple(Verification.__dataclass_fields__)
_SHARED: dict = {}  # what forked verification workers inherit (copy-on-write, never pickled)
PROCESS_MIN_PAIRS = 2000  # below this, worker processes cost more than they save


def _verify_rows(thumbs: np.ndarray, a: np.ndarray, b: np.ndarray, g: np.ndarray, early: float) -> np.ndarray:
    out = np.empty((len(a), len(_FIELDS)), np.float64)
    for i, (x, y, o) in enumerate(zip(a, b, g)):
        v = verify(thumbs[x], thumbs[y], int(o), early)
        out[i] = [getattr(v, f) for f in _FIELDS]
    return out


def _worker_rows(rows: np.ndarray) -> np.ndarray:
    a, b, g, early = _SHARED["a"], _SHARED["b"], _SHARED["g"], _SHARED["early"]
    return _verify_rows(_SHARED["thumbs"], a[rows], b[rows], g[rows], early)


def verify_pairs(thumbs: np.ndarray, pairs: pd.DataFrame, early: float = -1.0, threads: int = 1) -> pd.DataFrame:
    """``pairs`` (a, b, orientation) with each Verification's fields as columns. With several
    threads and many pairs, in that many forked worker processes (a registration is many small
    OpenCV and NumPy calls, so threads would wait for each other's interpreter lock): they
    inherit the thumbnails and run no OpenMP or OpenCV thread pool of their own (OpenCV is
    serial in medfold, see _one_thread), and compute every pair as the parent would."""
    a, b, g = (pairs[c].to_numpy() for c in ("a", "b", "orientation"))
    if threads <= 1 or len(pairs) < PROCESS_MIN_PAIRS:
        results = _verify_rows(thumbs, a, b, g, early)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        _SHARED.update(thumbs=thumbs, a=a, b=b, g=g, early=early)
        chunks = np.array_split(np.arange(len(pairs)), max(threads * 8, len(pairs) // 2000))
        try:
            with ProcessPoolExecutor(threads, mp_context=multiprocessing.get_context("fork")) as pool:
                results = np.concatenate(list(pool.map(_worker_rows, chunks)))
        finally:
            _SHARED.clear()
    return pairs.reset_index(drop=True).assign(**{f: results[:, i] for i, f in enumerate(_FIELDS)})


# ----------------------------------------------------------------------------- both stages
EXACT = "exact copy"  # identical decoded pixels
TRANSFORMED = "transformed copy"  # within the fingerprint's max_distance in some orientation
REGISTERED = "registered copy"  # found by registration only (cropped, shifted, retouched)


@dataclass(frozen=True)
class MatchSettings:
    """dataset.near_duplicates, typed."""

    max_distance: int = 5
    neighbours: int = 4
    min_score: float = 0.85
    early_score: float = 0.5

    @classmethod
    def from_config(cls, near) -> MatchSettings:
        """From ``dataset.near_duplicates`` (its settings, or the section's dict)."""
        from .settings import NearDuplicateSettings

        near = NearDuplicateSettings.of(near)
        return cls(**{k: getattr(near, k) for k in cls.__dataclass_fields__ if hasattr(near, k)})


def find_copies(
    bits: np.ndarray,
    signatures: list[Signature],
    content_hashes: np.ndarray,
    patients: np.ndarray,
    settings: MatchSettings,
    threads: int = 1,
) -> tuple[pd.DataFrame, dict]:
    """Every candidate pair of rows (fingerprints within ``max_distance``, and each image's
    ``neighbours`` nearest descriptors), verified, with ``accepted`` marking the copies. Pairs of
    one patient are left out: they are one group of the split already (a patient leaking across
    source folders is found as a patient), and two films of one body can look like one film.
    Returns the pairs (a < b, orientation taking a to b, fingerprint distance, descriptor
    similarity, kind, the Verification's fields, accepted) and the stages' counts and times."""
    import time

    start = time.perf_counter()
    by_print = fp.near_duplicate_pairs(bits, settings.max_distance)
    seconds = {"fingerprint_search": time.perf_counter() - start}
    start = time.perf_counter()
    desc = np.stack([s.descriptor for s in signatures]) if signatures else np.zeros((0, DIMS), np.int8)
    groups = pd.factorize(pd.Series(patients, dtype=object).astype(str))[0]
    by_descriptor = candidate_pairs(desc, settings.neighbours, threads, groups)
    seconds["descriptor_search"] = time.perf_counter() - start
    # one row per pair: the fingerprint's orientation where it matched (exact for its kinds)
    pairs = pd.concat(
        [by_print[["a", "b", "orientation"]], by_descriptor[["a", "b", "orientation"]]], ignore_index=True
    ).drop_duplicates(["a", "b"], keep="first")
    a, b, g = (pairs[c].to_numpy() for c in ("a", "b", "orientation"))
    one_group = patients[a] == patients[b]
    candidates = len(pairs)
    pairs = pairs.loc[~one_group].reset_index(drop=True)
    a, b, g = (pairs[c].to_numpy() for c in ("a", "b", "orientation"))
    words = fp._words(bits)
    distance = np.zeros(len(pairs), np.int64)
    similarity = np.zeros(len(pairs), np.float64)
    norms = np.maximum(np.linalg.norm(desc.astype(np.float64), axis=1), 1.0) if len(desc) else np.ones(0)
    for h in np.unique(g):
        rows = np.flatnonzero(g == h)
        distance[rows] = fp.hamming(fp._words(fp.oriented(bits[a[rows]], int(h))), words[b[rows]])
        oq = oriented_descriptors(desc[a[rows]], int(h)).astype(np.float64)
        similarity[rows] = (oq * desc[b[rows]]).sum(1) / (norms[a[rows]] * norms[b[rows]])
    exact = content_hashes[a] == content_hashes[b]
    pairs = pairs.assign(distance=distance, similarity=similarity.round(4))
    start = time.perf_counter()
    thumbs = np.stack([s.thumbnail for s in signatures]) if signatures else np.zeros((0, THUMB, THUMB), np.uint8)
    checked = verify_pairs(thumbs, pairs.loc[~exact], settings.early_score, threads)
    seconds["verification"] = time.perf_counter() - start
    identical = Verification(score=1.0, coarse=1.0, overlap=1.0)  # what identical pixels would score
    fields = list(Verification.__dataclass_fields__)
    for name in fields:
        pairs[name] = float(getattr(identical, name))
    pairs.loc[~exact, fields] = checked[fields].to_numpy()
    pairs["kind"] = np.where(
        exact, EXACT, np.where(pairs["distance"] <= settings.max_distance, TRANSFORMED, REGISTERED)
    )
    pairs["accepted"] = exact | (pairs["score"].to_numpy() >= settings.min_score)
    stats = {
        "candidates": int(candidates),
        "from_fingerprint": int(len(by_print)),
        "from_descriptor": int(len(by_descriptor)),
        "within_one_patient": int(one_group.sum()),
        "verified": int((~exact).sum()),
        "refined": int((pairs.loc[~exact, "coarse"] >= settings.early_score).sum()),
        "accepted": int(pairs["accepted"].sum()),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
    return pairs, stats
