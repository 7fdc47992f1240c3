"""Re-published copies of a radiograph found and verified: a candidate search with high recall,
then a registration of each candidate pair that says whether it is one film.

medfold.data.fingerprint finds copies whose pixels are only rotated, mirrored, rescaled, re-encoded
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
3. **Clusters** of accepted pairs are checked against their core (``checked_clusters``), so
   that a chain of pairs cannot join images that are not copies of one another.

Beyond chest films (issue 39): a fundus photograph, an ultrasound sector or a CT slice's air
has a *field of view*, a flat dark surround that is the same in every image of the modality;
it is found (``field_of_view``) and the verification is made within it (equalised over the
field, a band twice as wide, the score tile by tile; see ``verify``). Images smaller than the
96 px thumbnail are enlarged by bicubic interpolation, not block by block.

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

from medfold.data import fingerprint as fp


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
    """What matching keeps of one image: the candidate descriptor, the verification thumbnail,
    the thumbnail's field of view (None when the image fills its frame) and the image's own
    resolution."""

    descriptor: np.ndarray  # int8 (DIMS,)
    thumbnail: np.ndarray  # uint8 (THUMB, THUMB), equalised (within the field of view)
    field: np.ndarray | None = None  # bool (THUMB, THUMB): inside the field of view
    side: int = THUMB  # the image's shorter side (after trimming): its edge blurs over THUMB / side px


def moment_window(grey: np.ndarray) -> np.ndarray:
    """The part of ``grey`` within 2 standard deviations of its intensity centroid, per axis
    (intensity above the 5th percentile: the body, not the background, places it)."""
    rows, columns = moment_bounds(grey)
    return np.ascontiguousarray(grey[rows, columns])  # a view would make the area average's product slow


def moment_bounds(grey: np.ndarray) -> tuple[slice, slice]:
    """The rows and columns of ``moment_window``."""
    # the background level, cheaply: of the 16 x 16 area average (the same in every orientation)
    floor = _fifth_percentile(fp.area_average(grey, 16).ravel())
    weight = np.subtract(grey, floor, dtype=np.float64)
    np.maximum(weight, 0, out=weight)
    total = weight.sum()
    if total <= 0:
        return slice(None), slice(None)
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
        bounds.append(slice(lo, hi) if hi - lo >= 8 else slice(0, len(profile)))
    return bounds[0], bounds[1]


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


def descriptor(grey: np.ndarray, field: np.ndarray | None = None) -> np.ndarray:
    """With ``field`` (the field of view at ``grey``'s size), only the field is ranked and the
    surround takes the field's mean rank: ranked with it, the surround's tied black pixels would
    be ordered by position, one ramp shared by every fundus photograph."""
    rows, columns = moment_bounds(grey)
    small = fp.area_average(np.ascontiguousarray(grey[rows, columns]))
    values = small.ravel()
    inside = None
    if field is not None:
        inside = fp.area_average(np.ascontiguousarray(field[rows, columns], np.float64)).ravel() >= 0.5
        if inside.sum() < 16:
            inside = None
    if inside is None:
        order = np.argsort(values, kind="stable")
        ranks = np.empty(order.size, np.float64)
        ranks[order] = np.arange(order.size)  # the inverse permutation: each value's rank, ties by position
    else:
        order = np.argsort(values[inside], kind="stable")
        within = np.empty(order.size, np.float64)
        within[order] = np.arange(order.size) * ((values.size - 1) / max(1, order.size - 1))
        ranks = np.full(values.size, within.mean())
        ranks[inside] = within
    ranks = ranks.reshape(small.shape)
    block = dctn(ranks, norm="ortho")[:BLOCK, :BLOCK].ravel()[1:]
    norm = np.linalg.norm(block)
    return np.round(block / norm * SCALE).astype(np.int8) if norm > 0 else np.zeros(DIMS, np.int8)


def _resized(grey: np.ndarray) -> np.ndarray:
    """``grey`` at THUMB x THUMB: area-averaged when larger; when smaller (a 28 px MedMNIST
    image), enlarged by bicubic interpolation, since OpenCV's INTER_AREA enlarges like nearest
    neighbour and the blocks' edges, not the image, would fill the band-pass."""
    import cv2

    enlarge = min(grey.shape) < THUMB
    return cv2.resize(grey, (THUMB, THUMB), interpolation=cv2.INTER_CUBIC if enlarge else cv2.INTER_AREA)


def thumbnail(grey: np.ndarray, field: np.ndarray | None = None) -> np.ndarray:
    """The verification thumbnail: histogram-equalised, over the field of view when it has one
    (a fundus photograph's black surround would otherwise take a third of the grey levels)."""
    import cv2

    small = np.clip(np.round(_resized(grey)), 0, 255).astype(np.uint8)
    if field is None:
        return cv2.equalizeHist(small)
    counts = np.bincount(small[field], minlength=256)
    cdf = np.cumsum(counts)
    lo = cdf[np.flatnonzero(counts)[0]]
    table = np.clip(np.round((cdf - lo) / max(1, cdf[-1] - lo) * 255), 0, 255).astype(np.uint8)
    return np.where(field, table[small], 0).astype(np.uint8)


FIELD_DARK = 0.06  # background: at most this share of the grey range above the darkest level
FIELD_MIN, FIELD_MAX = 0.25, 0.95  # a field of view covers this much of the frame, or none is used
# A field of view's surround is flat and dark: a fundus photograph's is black (ODIR: grey levels'
# 90th less 10th percentile 0.8-2.1, 95th percentile 1.4-3.5), and stays flat when re-published
# with a colour cast (offsets up to 20 levels) or a JPEG's ringing (spread up to 3.9). A
# radiograph's dark corners are air and noise (Kermany, NIH: spread 2-13, 95th percentile 5-22),
# and its body's outline is detail the score should keep: a grey image needs a black, flat one.
FIELD_SPREAD = {"grey": 2.0, "colour": 8.0}
FIELD_BLACK = {"grey": 4.0, "colour": 40.0}


def field_of_view(grey: np.ndarray, colour: bool = False) -> np.ndarray | None:
    """The mask (at ``grey``'s size) of what lies inside the image's field of view: everything
    but the dark surround connected to the frame's edge (a fundus photograph's circle, an
    ultrasound sector, a CT slice's air). None when there is no such surround (a radiograph
    fills its frame) or when it would leave too little to compare."""
    import cv2

    small = cv2.GaussianBlur(np.asarray(grey, np.float32), (0, 0), 1.0)
    lo, hi = float(small.min()), float(np.percentile(small, 99))
    if hi - lo < 8:
        return None
    dark = (small <= lo + FIELD_DARK * (hi - lo)).astype(np.uint8)
    count, labels = cv2.connectedComponents(dark, connectivity=4)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    surround = np.isin(labels, edge[edge > 0])
    field = ~surround
    if not FIELD_MIN <= field.mean() <= FIELD_MAX:
        return None
    kind = "colour" if colour else "grey"
    p10, p90, p95 = np.percentile(grey[surround], (10, 90, 95))
    return field if p90 - p10 <= FIELD_SPREAD[kind] and p95 <= FIELD_BLACK[kind] else None


WORKING_SIDE = 256  # larger images are area-averaged to this first: both need far less


def signature(grey: np.ndarray, colour: bool = False) -> Signature:
    """From ``fingerprint.trimmed_grey(pixels)``. A 1024 px radiograph is first area-averaged
    to WORKING_SIDE (a signature took 13.5 ms, now 7.4 ms, of which the fingerprint 4.7 ms)."""
    import cv2

    side = int(min(grey.shape))
    if max(grey.shape) > WORKING_SIDE:
        grey = cv2.resize(grey, (WORKING_SIDE, WORKING_SIDE), interpolation=cv2.INTER_AREA)
    field = field_of_view(grey, colour)
    at_thumb = None
    if field is not None:
        at_thumb = cv2.resize(field.astype(np.uint8), (THUMB, THUMB), interpolation=cv2.INTER_NEAREST) > 0
    # the descriptor ranks within the field for colour photographs only: a grey image's field
    # needs a flat black surround that a JPEG re-encode of its copy takes away, and a descriptor
    # computed one way for the original and another for its copy would not find the pair
    # (Kermany: 1 of 40 mild copies lost); a colour photograph's field survives re-publication
    return Signature(descriptor(grey, field if colour else None), thumbnail(grey, at_thumb), at_thumb, side)


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


def _band(image: np.ndarray, sigmas: tuple[float, float], field: np.ndarray | None = None) -> np.ndarray:
    """The difference of two Gaussian blurs. With a field of view, each blur is a normalised
    convolution within it (the blur of image x field over the blur of field), so the edge of a
    fundus circle or an ultrasound sector, the same place in every photograph, is not detail."""
    import cv2

    if field is None:
        return cv2.GaussianBlur(image, (0, 0), sigmas[0]) - cv2.GaussianBlur(image, (0, 0), sigmas[1])
    weight = field.astype(np.float32)
    return (_field_blur(image, weight, sigmas[0]) - _field_blur(image, weight, sigmas[1])) * weight


def _field_blur(image: np.ndarray, weight: np.ndarray, sigma: float) -> np.ndarray:
    """The normalised convolution of ``image`` within ``weight`` (a float mask): the Gaussian
    blur of image x weight over the blur of weight, which the surround does not darken."""
    import cv2

    return cv2.GaussianBlur(image * weight, (0, 0), sigma) / np.maximum(cv2.GaussianBlur(weight, (0, 0), sigma), 1e-3)


# Where a field of view is compared (fundus photographs, ultrasound), the band is twice as
# wide: at BAND, an 8-bit gamma change or a JPEG re-encode of a dim photograph posterises what
# fine detail it has (ODIR: mild copies scored from 0.54, gamma copies from 0.57), and with the
# field's edge out of the score, distinct eyes stay far below (ODIR's 687 photographs: highest
# distinct-patient score 0.74 at twice the band, 0.94 at BAND with the edge in). The band is not
# widened for small images: at 28 px a band at the image's own scale is its anatomy, which
# distinct chest films share (NIH1000 at 28 px: 1,779 false merges with it, none without).
FIELD_BAND = 2.0


def band_sigmas(field: bool = False) -> tuple[float, float]:
    """The score's band-pass (Gaussian sigmas at THUMB px): BAND, FIELD_BAND times wider where a
    field of view is compared."""
    factor = FIELD_BAND if field else 1.0
    return BAND[0] * factor, BAND[1] * factor


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


def _overlap_score(
    band_a: np.ndarray, band_b: np.ndarray, warp: np.ndarray, fields: tuple | None = None
) -> tuple[float, float]:
    """Correlation of ``band_a`` and ``band_b`` warped onto it (``warp`` at THUMB px, b's
    coordinates from a's), over their overlap, and that overlap's share of a (of a's field of
    view when ``fields``, the two float masks, are given)."""
    import cv2

    size = (THUMB, THUMB)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    moved = cv2.warpAffine(band_b, warp, size, flags=flags)
    valid = cv2.warpAffine(_inner(), warp, size, flags=flags) > 0.999
    if fields is not None:
        field_a, field_b = fields
        valid &= (field_a > 0.999) & (cv2.warpAffine(field_b, warp, size, flags=flags) > 0.999)
        overlap = float(valid.sum() / max(1.0, float((field_a > 0.999).sum())))
    else:
        overlap = float(valid.mean())
    if overlap < MIN_OVERLAP:
        return -1.0, overlap
    score = _zncc(band_a[valid], moved[valid])
    if fields is not None:
        score = min(score, _tiled(band_a, moved, valid))
    return score, overlap


TILES = 3  # within a field of view, the score must hold across a TILES x TILES grid of its parts
# the median tile: ODIR's distinct eyes scored at most 0.74 without the tiles and 0.70 with them;
# the lower quartile (0.65) cost mild copies of dim photographs more than it gained
TILE_QUANTILE = 0.5


def _tiled(band_a: np.ndarray, moved: np.ndarray, valid: np.ndarray) -> float:
    """The TILE_QUANTILE of the correlations in the tiles of a TILES x TILES grid that hold at
    least a third of their pixels in the overlap. A featureless photograph's band-pass is one
    bright blob (the optic disc) and shading: aligned, two such photographs correlate as a whole,
    but not tile by tile; a copy's detail lines up in every tile."""
    step = THUMB // TILES
    found = []
    for i in range(TILES):
        for j in range(TILES):
            cell = (slice(i * step, (i + 1) * step), slice(j * step, (j + 1) * step))
            inside = valid[cell]
            if inside.mean() >= 1 / 3:
                found.append(_zncc(band_a[cell][inside], moved[cell][inside]))
    if not found:
        return -1.0
    return float(np.quantile(found, TILE_QUANTILE))


def _as_signature(item) -> Signature:
    return item if isinstance(item, Signature) else Signature(np.zeros(DIMS, np.int8), item)


def verify(sig_a, sig_b, orientation: int, early: float = -1.0) -> Verification:
    """Register b's thumbnail (oriented back by ``orientation``, the transform taking a to b)
    onto a's and score their overlap (each a Signature, or a bare thumbnail). A pair scoring
    below ``early`` after the coarse level is not refined: distinct images mostly stop there,
    their detail lining up nowhere. Where both have a field of view, the score is taken inside
    both fields only, their band-pass computed within them. Where one has a field and the other
    not (a copy whose black surround a JPEG re-encode or a crop took away, a colour cast lifted),
    the better of the two ways is kept: with the one field, and as two full frames."""
    sig_a, sig_b = _as_signature(sig_a), _as_signature(sig_b)
    back = inverse_orientations()[orientation]
    a = sig_a.thumbnail.astype(np.float32)
    b = orient_pixels(sig_b.thumbnail, back).astype(np.float32)
    if sig_a.field is None and sig_b.field is None:
        return _registered(a, b, None, early)
    full = np.ones((THUMB, THUMB), bool)
    margin = field_margin(min(sig_a.side, sig_b.side))
    fa = _eroded(full if sig_a.field is None else sig_a.field, margin)
    fb = _eroded(full if sig_b.field is None else orient_pixels(sig_b.field, back), margin)
    within = _registered(a, b, (fa, fb), early)
    if sig_a.field is not None and sig_b.field is not None:
        return within
    frames = _registered(a, b, None, early)
    return frames if frames.score > within.score else within


def _registered(a: np.ndarray, b: np.ndarray, fields: tuple | None, early: float) -> Verification:
    """The registration of thumbnail ``b`` onto ``a`` (float32, b already oriented) and its
    score: over the whole frames, or within ``fields`` (the two eroded float masks)."""
    import cv2

    sigmas = band_sigmas(fields is not None)
    if fields is not None:
        fa, fb = fields
        band_a, band_b = _band(a, sigmas, fa > 0), _band(b, sigmas, fb > 0)
        # registered without the field's edge: a re-framed copy's circle is not where the
        # original's is, and the edge, the strongest gradient, would pull ECC onto it
        a, b = _filled(a, fa > 0), _filled(b, fb > 0)
    else:
        band_a, band_b = _band(a, sigmas), _band(b, sigmas)

    def level(side):
        return [
            cv2.GaussianBlur(cv2.resize(x, (side, side), interpolation=cv2.INTER_AREA), (0, 0), 1.0) for x in (a, b)
        ]

    best = Verification(score=-1.0)
    warp = _ecc(*level(REGISTER_SIDE // 2), np.eye(2, 3, dtype=np.float32), COARSE_ITERATIONS)
    if warp is None:
        warp = np.eye(2, 3, dtype=np.float32)
    else:
        best = _verification(band_a, band_b, _at_size(warp, THUMB / (REGISTER_SIDE // 2)), True, fields)
        if best.score < early:
            return best
    fine = _ecc(*level(REGISTER_SIDE), _at_size(warp, 2.0).astype(np.float32), FINE_ITERATIONS)
    if fine is not None:
        refined = _verification(band_a, band_b, _at_size(fine, THUMB / REGISTER_SIDE), False, fields)
        if refined.score >= best.score:
            return Verification(**{**refined.__dict__, "coarse": best.score})
    return Verification(**{**best.__dict__, "coarse": best.score})


def _filled(image: np.ndarray, field: np.ndarray) -> np.ndarray:
    """``image`` with its surround replaced by a smooth extension of the field (a wide
    normalised blur of the field's content), so that nothing marks where the field ends."""
    smooth = _field_blur(image, field.astype(np.float32), THUMB / 12)
    return np.where(field, image, smooth).astype(np.float32)


FIELD_MARGIN = 2  # pixels of the field of view's edge left out of the score (JPEG ringing, blur)


def field_margin(side: int) -> int:
    """The field's edge left out, in THUMB px: FIELD_MARGIN, or 1.5 of the image's own pixels
    where those are larger (a 28 px fundus photograph's circle is a ramp 2-3 of its pixels wide,
    inside the field as detected, and the same in every photograph)."""
    return max(FIELD_MARGIN, int(np.ceil(1.5 * THUMB / max(1, side))))


def _eroded(field: np.ndarray, margin: int = FIELD_MARGIN) -> np.ndarray:
    """A field of view less ``margin`` pixels of its edge, as float32 (to be warped)."""
    import cv2

    kernel = np.ones((2 * margin + 1, 2 * margin + 1), np.uint8)
    return cv2.erode(field.astype(np.uint8), kernel, borderValue=1).astype(np.float32)


def _verification(band_a, band_b, warp: np.ndarray, coarse: bool, fields=None) -> Verification:
    score, overlap = _overlap_score(band_a, band_b, warp, fields)
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


def _verify_rows(signatures: list, a: np.ndarray, b: np.ndarray, g: np.ndarray, early: float) -> np.ndarray:
    out = np.empty((len(a), len(_FIELDS)), np.float64)
    for i, (x, y, o) in enumerate(zip(a, b, g)):
        v = verify(signatures[x], signatures[y], int(o), early)
        out[i] = [getattr(v, f) for f in _FIELDS]
    return out


def _worker_rows(rows: np.ndarray) -> np.ndarray:
    a, b, g, early = _SHARED["a"], _SHARED["b"], _SHARED["g"], _SHARED["early"]
    return _verify_rows(_SHARED["signatures"], a[rows], b[rows], g[rows], early)


def verify_pairs(signatures: list, pairs: pd.DataFrame, early: float = -1.0, threads: int = 1) -> pd.DataFrame:
    """``pairs`` (a, b, orientation) with each Verification's fields as columns. With several
    threads and many pairs, in that many forked worker processes (a registration is many small
    OpenCV and NumPy calls, so threads would wait for each other's interpreter lock): they
    inherit the signatures and run no OpenMP or OpenCV thread pool of their own (OpenCV is
    serial in medfold, see _one_thread), and compute every pair as the parent would."""
    a, b, g = (pairs[c].to_numpy() for c in ("a", "b", "orientation"))
    if threads <= 1 or len(pairs) < PROCESS_MIN_PAIRS:
        results = _verify_rows(signatures, a, b, g, early)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        _SHARED.update(signatures=signatures, a=a, b=b, g=g, early=early)
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
        from medfold.settings.sections import NearDuplicateSettings

        near = NearDuplicateSettings.of(near)
        return cls(**{k: getattr(near, k) for k in cls.__dataclass_fields__ if hasattr(near, k)})


def _oriented_distances(pairs: pd.DataFrame, bits: np.ndarray, desc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each pair's fingerprint distance and descriptor cosine similarity, with a turned by the
    pair's orientation."""
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
    return distance, similarity


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
    a, b = pairs["a"].to_numpy(), pairs["b"].to_numpy()
    distance, similarity = _oriented_distances(pairs, bits, desc)
    exact = content_hashes[a] == content_hashes[b]
    pairs = pairs.assign(distance=distance, similarity=similarity.round(4))
    start = time.perf_counter()
    checked = verify_pairs(signatures, pairs.loc[~exact], settings.early_score, threads)
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


# ----------------------------------------------------------------------------- clusters
CORE_ROUNDS = 5  # rounds of the core check; each cuts links, none has needed more than 2 here
LARGE_CLUSTER = 10  # a copy cluster larger than this is listed with its weakest links


@lru_cache(maxsize=1)
def _compositions() -> np.ndarray:
    """table[g, h]: the orientation that is g followed by h."""
    probe = np.arange(16).reshape(4, 4)
    table = np.zeros((8, 8), np.int64)
    for g in range(8):
        for h in range(8):
            moved = orient_pixels(orient_pixels(probe, g), h)
            table[g, h] = next(k for k in range(8) if np.array_equal(orient_pixels(probe, k), moved))
    return table


def checked_clusters(
    count: int, accepted: pd.DataFrame, signatures: list, settings: MatchSettings
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Copy clusters that cannot grow by chaining. Accepted pairs (a, b, orientation, score)
    join images into clusters; in every cluster of three or more, each image is verified against
    the cluster's core (the image with the highest sum of accepted scores), in the orientation
    its chain of pairs composes to. An image that scores below ``early_score`` against the core
    (what distinct images score, not two changed copies of one: a copy cropped one way against
    one re-encoded another scores less than either against the original, and min_score there
    cut 17 true links of planted copies on NIH1000) is a link the chain made, not a copy of the
    same image: its pairs to the rest are cut, and the check repeats on what remains. Returns
    the pairs kept and the links cut (a, b, their score, the image that failed and its score
    against the core)."""
    kept = accepted.reset_index(drop=True)
    cut = []
    inverse = np.array(inverse_orientations())
    compose = _compositions()
    for _ in range(CORE_ROUNDS):
        if kept.empty:
            break
        a, b = kept["a"].to_numpy(), kept["b"].to_numpy()
        component = fp.clusters(count, a, b)
        weak: dict[int, tuple[int, float]] = {}  # image -> (its core, score against it)
        for members in pd.Series(np.arange(count)).groupby(component).agg(list):
            if len(members) < 3:
                continue
            rows = np.flatnonzero(np.isin(a, members))
            weight = pd.concat(
                [
                    kept.iloc[rows][["a", "score"]].set_axis(["i", "s"], axis=1),
                    kept.iloc[rows][["b", "score"]].set_axis(["i", "s"], axis=1),
                ]
            )
            totals = weight.groupby("i")["s"].sum()
            core = int(totals.sort_index().idxmax())
            for member, orientation in _orientations_from(core, kept.iloc[rows], inverse, compose).items():
                if member == core or _linked(kept.iloc[rows], core, member):
                    continue
                score = verify(signatures[core], signatures[member], orientation).score
                if score < settings.early_score:
                    weak[member] = (core, score)
        if not weak:
            break
        failing = np.array(sorted(weak))
        in_a, in_b = np.isin(a, failing), np.isin(b, failing)
        drop = in_a ^ in_b  # a link between a failing image and one that held
        for row in np.flatnonzero(drop):
            who = int(a[row] if in_a[row] else b[row])
            cut.append(
                {
                    "a": int(a[row]),
                    "b": int(b[row]),
                    "score": float(kept["score"].iat[row]),
                    "image": who,
                    "core": weak[who][0],
                    "score_against_core": round(weak[who][1], 4),
                }
            )
        kept = kept.loc[~drop].reset_index(drop=True)
    columns = ["a", "b", "score", "image", "core", "score_against_core"]
    return kept, pd.DataFrame(cut, columns=columns)


def largest_cluster(count: int, pairs: pd.DataFrame) -> int:
    """The largest cluster that ``pairs`` (columns a, b) join among ``count`` images (1 when none)."""
    if pairs.empty:
        return 1
    return int(np.bincount(fp.clusters(count, pairs["a"].to_numpy(), pairs["b"].to_numpy())).max())


def _linked(pairs: pd.DataFrame, x: int, y: int) -> bool:
    lo, hi = min(x, y), max(x, y)
    return bool(((pairs["a"] == lo) & (pairs["b"] == hi)).any())


def _orientations_from(core: int, pairs: pd.DataFrame, inverse: np.ndarray, compose: np.ndarray) -> dict[int, int]:
    """Each image reachable from ``core`` through ``pairs``: the orientation taking the core to
    it, composed along a shortest chain (breadth first, neighbours in index order)."""
    links: dict[int, list[tuple[int, int]]] = {}
    for x, y, g in zip(pairs["a"].to_numpy(), pairs["b"].to_numpy(), pairs["orientation"].to_numpy()):
        links.setdefault(int(x), []).append((int(y), int(g)))  # a to b: g
        links.setdefault(int(y), []).append((int(x), int(inverse[g])))  # b to a: g undone
    seen = {core: 0}  # orientation 0 is the identity
    queue = [core]
    while queue:
        here = queue.pop(0)
        for there, g in sorted(links.get(here, [])):
            if there not in seen:
                seen[there] = int(compose[seen[here], g])
                queue.append(there)
    return seen
