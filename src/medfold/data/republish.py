"""Re-published copies of a radiograph, as public collections hold them: what a second journal,
a teaching file or another collection did to the same film before it was scraped again.

Each kind is one change a re-publication makes (measured against in bench/near_duplicates.py
and tests/test_near_duplicates.py); ``combined`` stacks several, as real copies do. All draw
from the generator they are given, so a seed gives the same copy on any host.

Ranges (issue 23): crops of 1-8 % on any side, shifts, rescale 0.5-2x with and without the
aspect, rotation up to 3 degrees, gamma 0.6-1.6, contrast and brightness, histogram
equalisation, JPEG quality 30-95, borders, burned-in text and arrows. ``mild`` is the envelope
the default thresholds must find with recall >= 0.99: crops up to 5 % and gamma 0.7-1.4.

Colour photographs (issue 39: fundus photographs are re-published with another white balance,
cropped to their circle, re-encoded in colour) keep their colour: the grey kinds change each
channel alike (the same random draws for the three), and ``white_balance``, ``circle`` and
``colour_jpeg`` act on the colour image itself; a grey image stays grey under all of them.
``small(pixels)`` is the MedMNIST way of making a 28 px image (area average to 28 x 28), which
the benchmark applies to both images of a pair.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps


def _grey(pixels: np.ndarray) -> Image.Image:
    image = Image.fromarray(pixels)
    return image.convert("L") if image.mode != "L" else image


def _crop(image: Image.Image, rng, most: float = 0.08) -> Image.Image:
    """1 % to ``most`` off each of a random non-empty set of sides."""
    w, h = image.size
    sides = rng.random(4) < 0.5
    sides[rng.integers(4)] = True
    cut = np.where(sides, rng.uniform(0.01, most, 4), 0.0)
    left, top, right, bottom = (cut * [w, h, w, h]).round().astype(int)
    return image.crop((left, top, w - right, h - bottom))


def crop(image, rng):
    return _crop(image, rng, 0.08)


def crop_mild(image, rng):
    return _crop(image, rng, 0.05)


def shift(image: Image.Image, rng) -> Image.Image:
    """The film moved by up to 6 % in each direction, the uncovered edge black."""
    w, h = image.size
    dx, dy = (rng.uniform(-0.06, 0.06, 2) * [w, h]).round().astype(int)
    out = Image.new("L", (w, h), 0)
    out.paste(image, (int(dx), int(dy)))
    return out


def rescale(image: Image.Image, rng) -> Image.Image:
    factor = rng.uniform(np.log(0.5), np.log(2.0))
    w, h = image.size
    s = float(np.exp(factor))
    return image.resize((max(16, round(w * s)), max(16, round(h * s))), Image.Resampling.BICUBIC)


def rescale_aspect(image: Image.Image, rng) -> Image.Image:
    """Width and height scaled apart (0.5-2x each, the aspect changed by up to 25 %)."""
    w, h = image.size
    sx = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    sy = sx * float(np.exp(rng.uniform(np.log(0.8), np.log(1.25))))
    sy = min(2.0, max(0.5, sy))
    return image.resize((max(16, round(w * sx)), max(16, round(h * sy))), Image.Resampling.BILINEAR)


def rotate(image: Image.Image, rng) -> Image.Image:
    angle = float(rng.uniform(1.0, 3.0) * rng.choice([-1, 1]))
    return image.rotate(angle, Image.Resampling.BILINEAR, expand=False, fillcolor=0)


def _gamma(image: Image.Image, lo: float, hi: float, rng) -> Image.Image:
    g = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    table = np.round(255 * (np.arange(256) / 255) ** g).astype(np.uint8)
    return image.point(table.tolist())


def gamma(image, rng):
    return _gamma(image, 0.6, 1.6, rng)


def gamma_mild(image, rng):
    return _gamma(image, 0.7, 1.4, rng)


def contrast(image: Image.Image, rng) -> Image.Image:
    """a x + b, clipped: contrast 0.7-1.3, brightness -30..+30 grey levels."""
    a, b = rng.uniform(0.7, 1.3), rng.uniform(-30, 30)
    table = np.clip(np.round(a * (np.arange(256) - 128) + 128 + b), 0, 255).astype(np.uint8)
    return image.point(table.tolist())


def equalize(image: Image.Image, rng) -> Image.Image:
    return ImageOps.equalize(image)


def jpeg(image: Image.Image, rng) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=int(rng.integers(30, 96)))
    buf.seek(0)
    return Image.open(buf).convert("L")


def border(image: Image.Image, rng) -> Image.Image:
    """A frame of 2-10 % in black, white or grey, not always even."""
    w, h = image.size
    pads = (rng.uniform(0.02, 0.10, 4) * [w, h, w, h]).round().astype(int)
    return ImageOps.expand(image, tuple(int(p) for p in pads), fill=int(rng.choice([0, 255, 128])))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # an old Pillow without scalable default font
        return ImageFont.load_default()


def text(image: Image.Image, rng) -> Image.Image:
    """A burned-in side marker, date stamp or label in a corner, white or black."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    w, h = out.size
    words = [
        "L",
        "R",
        "PORTABLE",
        "AP SUPINE",
        f"{rng.integers(1, 29):02d}/{rng.integers(1, 13):02d}/20{rng.integers(10, 24)}",
    ]
    label = str(words[rng.integers(len(words))])
    size = max(8, int(h * rng.uniform(0.04, 0.08)))
    x = int(rng.uniform(0.03, 0.6) * w)
    y = int(rng.choice([rng.uniform(0.02, 0.1), rng.uniform(0.85, 0.92)]) * h)
    draw.text((x, y), label, fill=int(rng.choice([255, 0])), font=_font(size))
    return out


def arrow(image: Image.Image, rng) -> Image.Image:
    """An annotation arrow pointing into the lung fields."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    w, h = out.size
    tip = np.array([rng.uniform(0.25, 0.75) * w, rng.uniform(0.3, 0.7) * h])
    angle = rng.uniform(0, 2 * np.pi)
    length = rng.uniform(0.08, 0.16) * min(w, h)
    tail = tip + length * np.array([np.cos(angle), np.sin(angle)])
    width = max(1, int(min(w, h) * 0.012))
    colour = int(rng.choice([255, 0]))
    draw.line([tuple(tail), tuple(tip)], fill=colour, width=width)
    for turn in (0.5, -0.5):  # the head: two short strokes back from the tip
        back = tip + 0.35 * length * np.array([np.cos(angle + turn), np.sin(angle + turn)])
        draw.line([tuple(tip), tuple(back)], fill=colour, width=width)
    return out


def orientation(image: Image.Image, rng) -> Image.Image:
    """One of the 7 other dihedral orientations (rotated by 90/180/270 degrees, mirrored)."""
    ops = [
        Image.Transpose.ROTATE_90,
        Image.Transpose.ROTATE_180,
        Image.Transpose.ROTATE_270,
        Image.Transpose.FLIP_LEFT_RIGHT,
        Image.Transpose.FLIP_TOP_BOTTOM,
        Image.Transpose.TRANSPOSE,
        Image.Transpose.TRANSVERSE,
    ]
    return image.transpose(ops[rng.integers(len(ops))])


KINDS: dict[str, Callable] = {
    "crop": crop,
    "shift": shift,
    "rescale": rescale,
    "rescale_aspect": rescale_aspect,
    "rotate": rotate,
    "gamma": gamma,
    "contrast": contrast,
    "equalize": equalize,
    "jpeg": jpeg,
    "border": border,
    "text": text,
    "arrow": arrow,
    "orientation": orientation,
}
# the envelope the defaults are held to (recall >= 0.99), and what a re-publication stacks
MILD = ("crop_mild", "gamma_mild")
STACKABLE = ("crop", "shift", "rescale_aspect", "rotate", "gamma", "contrast", "jpeg", "border", "text", "arrow")


def mild(image, rng):
    """Crops up to 5 % with gamma 0.7-1.4, and a re-encode: the recall target's envelope."""
    return _step("jpeg", _step("gamma_mild", _step("crop_mild", image, rng), rng), rng)


def same_frame(image, rng):
    """The same frame exported again: gamma 0.7-1.4 and a re-encode, nothing moved (what a video
    or a second export of one ultrasound frame gives; the 28 px recall target's kind)."""
    return _step("jpeg", _step("gamma_mild", image, rng), rng)


def combined(image, rng):
    """Two to four of the changes in a random order, in a random orientation half the time."""
    chosen = rng.choice(len(STACKABLE), int(rng.integers(2, 5)), replace=False)
    for i in chosen:
        image = _step(STACKABLE[i], image, rng)
    return _step("orientation", image, rng) if rng.random() < 0.5 else image


KINDS.update(
    {"crop_mild": crop_mild, "gamma_mild": gamma_mild, "mild": mild, "same_frame": same_frame, "combined": combined}
)


# ----------------------------------------------------------------------------- colour
def white_balance(image: Image.Image, rng) -> Image.Image:
    """Another camera's or viewer's white balance: each channel times 0.75-1.25, plus -20..+20."""
    if image.mode != "RGB":
        return contrast(image, rng)
    pixels = np.asarray(image, np.float32)
    gains, offsets = rng.uniform(0.75, 1.25, 3), rng.uniform(-20, 20, 3)
    return Image.fromarray(np.clip(np.round(pixels * gains + offsets), 0, 255).astype(np.uint8))


def circle(image: Image.Image, rng) -> Image.Image:
    """Cropped to a centred circle (90-100 % of the shorter side across), black outside, and the
    square around it kept: how fundus collections re-frame a photograph."""
    w, h = image.size
    diameter = min(w, h) * rng.uniform(0.9, 1.0)
    cx, cy = w / 2 + rng.uniform(-0.02, 0.02) * w, h / 2 + rng.uniform(-0.02, 0.02) * h
    y, x = np.mgrid[0:h, 0:w]
    inside = (x + 0.5 - cx) ** 2 + (y + 0.5 - cy) ** 2 <= (diameter / 2) ** 2
    pixels = np.asarray(image).copy()
    pixels[~inside] = 0
    r = int(diameter / 2)
    box = (max(0, int(cx) - r), max(0, int(cy) - r), min(w, int(cx) + r), min(h, int(cy) + r))
    return Image.fromarray(pixels).crop(box)


def colour_jpeg(image: Image.Image, rng) -> Image.Image:
    """Re-encoded as a colour JPEG (chroma subsampled), quality 30-95."""
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=int(rng.integers(30, 96)))
    buf.seek(0)
    return Image.open(buf).convert(image.mode)


def recoloured(image, rng):
    """A colour re-publication: crops up to 5 %, another white balance, a colour JPEG."""
    return colour_jpeg(white_balance(crop_mild(image, rng), rng), rng)


COLOUR = {"white_balance": white_balance, "circle": circle, "colour_jpeg": colour_jpeg, "recoloured": recoloured}
KINDS.update(COLOUR)
SMALL = 28  # MedMNIST's side


def small(pixels: np.ndarray, side: int = SMALL) -> np.ndarray:
    """``pixels`` area-averaged to side x side (grey or RGB), as MedMNIST's images were made."""
    return np.asarray(Image.fromarray(pixels).resize((side, side), Image.Resampling.BOX))


def _per_channel(kind: Callable, image: Image.Image, rng) -> Image.Image:
    """A grey kind on a colour image: each channel changed with the same random draws."""
    state = rng.bit_generator.state
    channels = []
    for band in image.split():
        rng.bit_generator.state = state
        channels.append(kind(band, rng).convert("L"))
    return Image.merge("RGB", channels)


STACKED = ("mild", "same_frame", "combined")  # kinds made of other kinds' steps


def _step(name: str, image: Image.Image, rng) -> Image.Image:
    """One kind on a grey or a colour image: a grey kind on colour changes each channel alike
    (a JPEG re-encodes in colour); colour and stacked kinds take the image as it is."""
    if image.mode != "RGB" or name in COLOUR or name in STACKED:
        return KINDS[name](image, rng)
    return colour_jpeg(image, rng) if name == "jpeg" else _per_channel(KINDS[name], image, rng)


def republished(pixels: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A copy of ``pixels`` (uint8, grey or RGB) changed as ``kind`` (a key of KINDS) does: grey
    for a grey image, colour for a colour one."""
    from medfold.data.images import is_colour

    if kind not in KINDS:
        raise ValueError(f"unknown kind of copy {kind!r}; known: {sorted(KINDS)}")
    image = Image.fromarray(pixels[..., :3]) if is_colour(pixels) else _grey(pixels)
    if (
        kind == "jpeg" and image.mode == "RGB"
    ):  # the kind alone re-encodes each channel as grey (colour_jpeg: in colour)
        return np.asarray(_per_channel(jpeg, image, rng))
    return np.asarray(_step(kind, image, rng))
