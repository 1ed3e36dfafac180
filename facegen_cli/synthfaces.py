"""Built-in labelled faces: a deterministic procedural renderer with exact labels and landmarks.

No face data set can be downloaded on the machines facegen is built on, so the project renders its
own: front-facing faces in CelebA's aligned framing (eyes at 39% / 61% of the width and about half
the height), drawn at 4x with Pillow and downsampled for anti-aliasing. Every one of the 12 default
attributes is drawn visibly; face shape, eye colour, skin tone, head size, position, small rotation,
background, lighting, camera noise and blur vary with no label to explain them.

`render_face(seed, size)` -> (uint8 image, labels dict, landmarks dict); the same seed gives the same
pixels. `write_dataset` writes a CelebA-layout folder that `facegen train` reads like real CelebA.
"""

import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from . import layout
from .attributes import DEFAULT_ATTRIBUTES, celeba_column
from .errors import FacegenError
from .files import atomic_path, check_replaceable_folder
from .layout import LANDMARK_NAMES

SUPERSAMPLE = 4
STREAMS = ("labels", "geometry", "colours", "beard", "glasses", "hat", "hair", "nuisance")
MARGIN = 0.15  # drawn beyond the frame on each side, so that rotating and shifting never shows an edge

SKIN_TONES = np.array([(141, 85, 36), (170, 110, 70), (198, 134, 66), (224, 172, 105), (232, 190, 150),
                       (241, 194, 125)], dtype=float)
PALE_SKIN = np.array([(250, 232, 222), (246, 226, 214)], dtype=float)
HAIR = {
    "black": [(20, 18, 20), (35, 28, 25)],
    "blond": [(230, 200, 120), (215, 180, 95), (240, 215, 150)],
    "brown": [(95, 60, 35), (120, 80, 45), (75, 50, 30)],
    "red": [(160, 70, 35), (180, 90, 50)],
    "gray": [(170, 170, 170), (200, 200, 200), (140, 140, 145)],
}
EYE_COLOURS = [(70, 45, 25), (40, 90, 150), (60, 120, 70), (110, 80, 40), (30, 30, 30)]


def sample_labels(rng):
    """Attributes with CelebA-like frequencies and dependencies; every combination stays possible."""
    male = rng.random() < 0.45
    hat = rng.random() < 0.08
    labels = {
        "male": male,
        "young": rng.random() < 0.72,
        "smiling": rng.random() < 0.48,
        "eyeglasses": rng.random() < 0.10,
        "beard": rng.random() < (0.40 if male else 0.01),
        "mustache": rng.random() < (0.20 if male else 0.01),
        "bald": not hat and rng.random() < (0.10 if male else 0.01),
        "wearing_hat": hat,
        "pale_skin": rng.random() < 0.10,
    }
    labels["bangs"] = not labels["bald"] and rng.random() < (0.08 if male else 0.25)
    hair = rng.choice(["black", "blond", "other"], p=[0.25, 0.15 if not male else 0.07, 0.60 if not male else 0.68])
    labels["black_hair"], labels["blond_hair"] = hair == "black", hair == "blond"
    return labels


def sample_independent_labels(rng):
    """Attributes without the data's dependencies: each present half the time whatever the others (one hair
    colour in three; a bald head, one face in four, still never has bangs or a hat). A classifier trained
    on these cannot take a beard as a sign of a man, so it reads rare combinations as well as common ones."""
    labels = {name: rng.random() < 0.5 for name in ("male", "young", "smiling", "eyeglasses", "beard", "mustache",
                                                    "pale_skin")}
    bald = rng.random() < 0.25
    labels.update(bald=bald, bangs=not bald and rng.random() < 0.5, wearing_hat=not bald and rng.random() < 0.5)
    hair = rng.choice(["black", "blond", "other"])
    labels["black_hair"], labels["blond_hair"] = hair == "black", hair == "blond"
    return labels


LABEL_DISTRIBUTIONS = {"celeba": sample_labels, "independent": sample_independent_labels}


def _mix(a, b, w):
    return tuple(int(round(x * (1 - w) + y * w)) for x, y in zip(a, b))


def _jitter(rng, colour, amount):
    return tuple(int(np.clip(c + rng.normal(0, amount), 0, 255)) for c in colour)


class FaceGeometry:
    """Canonical positions in [0, 1] coordinates for one face (before the nuisance transform)."""

    def __init__(self, rng, labels):
        self.cx = 0.5
        self.eye_y = rng.normal(0.50, 0.01)
        self.eye_dx = rng.normal(0.11, 0.006)
        self.face_w = rng.normal(0.27 if labels["male"] else 0.245, 0.012)  # half-width at the cheeks
        self.jaw_w = self.face_w * (rng.normal(0.78, 0.03) if labels["male"] else rng.normal(0.62, 0.04))
        self.chin_y = rng.normal(0.885, 0.012)
        self.top_y = rng.normal(0.16, 0.012)  # skull top
        self.hairline_y = rng.normal(0.27, 0.012)
        self.mouth_y = self.eye_y + rng.normal(0.235, 0.01)
        self.mouth_w = rng.normal(0.075, 0.006)
        self.nose_tip_y = self.eye_y + rng.normal(0.12, 0.008)
        self.brow_y = self.eye_y - rng.normal(0.055, 0.005)
        self.eye_w = rng.normal(0.040, 0.003)
        self.eye_h = rng.normal(0.017, 0.002)

    def jaw(self):
        """9 points from the left temple round the chin to the right temple."""
        pts = []
        for i in range(9):
            a = math.pi * i / 8  # 0 = left, pi/2 = chin, pi = right
            y = self.eye_y + (self.chin_y - self.eye_y) * math.sin(a) ** 0.9
            w = self.face_w + (self.jaw_w - self.face_w) * math.sin(a) ** 2
            pts.append((self.cx - w * math.cos(a) * (1 if i != 4 else 0), y))
        return pts

    def face_outline(self, n=64):
        """Closed outline: the upper half is an ellipse to the skull top, the lower half follows the jaw."""
        pts = []
        for i in range(n + 1):
            a = math.pi * i / n  # left -> right over the top
            pts.append((self.cx - self.face_w * 1.02 * math.cos(a), self.eye_y - (self.eye_y - self.top_y) * math.sin(a)))
        for i in range(n + 1):
            a = math.pi * i / n  # right -> left under the chin
            y = self.eye_y + (self.chin_y - self.eye_y) * math.sin(a) ** 0.9
            w = self.face_w + (self.jaw_w - self.face_w) * math.sin(a) ** 2
            pts.append((self.cx + w * math.cos(a), y))
        return pts


class Canvas:
    """Draws in [0, 1] coordinates on a supersampled RGB image."""

    def __init__(self, size, rng):
        self.px = size * SUPERSAMPLE  # pixels per unit
        self.offset = MARGIN * self.px
        self.full = int(round((1 + 2 * MARGIN) * self.px))  # canvas side, margins included
        self.image = Image.fromarray(_background(rng, self.full))
        self.draw = ImageDraw.Draw(self.image)

    def xy(self, pts):
        return [(x * self.px + self.offset, y * self.px + self.offset) for x, y in pts]

    def box(self, cx, cy, rx, ry):
        (x0, y0), (x1, y1) = self.xy([(cx - rx, cy - ry), (cx + rx, cy + ry)])
        return [x0, y0, x1, y1]

    def width(self, w):
        return max(1, int(round(w * self.px)))

    def polygon(self, pts, fill):
        self.draw.polygon(self.xy(pts), fill=fill)

    def line(self, pts, fill, w):
        self.draw.line(self.xy(pts), fill=fill, width=self.width(w), joint="curve")

    def ellipse(self, cx, cy, rx, ry, fill=None, outline=None, w=0.0):
        self.draw.ellipse(self.box(cx, cy, rx, ry), fill=fill, outline=outline, width=self.width(w) if outline else 0)

    def layer_mask(self, draw_fn):
        """An 'L' mask drawn by draw_fn(ImageDraw, xy) at canvas resolution."""
        mask = Image.new("L", self.image.size, 0)
        draw_fn(ImageDraw.Draw(mask))
        return mask

    def paste(self, colour_array, mask):
        self.image.paste(Image.fromarray(colour_array), (0, 0), mask)


def _curve(p0, p1, p2, n=16):
    """Quadratic Bezier points from p0 through control p1 to p2."""
    t = np.linspace(0, 1, n)[:, None]
    pts = (1 - t) ** 2 * np.array(p0) + 2 * (1 - t) * t * np.array(p1) + t**2 * np.array(p2)
    return [tuple(p) for p in pts]


def _background(rng, px):
    top, bottom = rng.integers(30, 230, 3), rng.integers(30, 230, 3)
    ramp = np.linspace(0, 1, px)[:, None, None]
    return np.broadcast_to(top * (1 - ramp) + bottom * ramp, (px, px, 3)).astype(np.uint8)


def _shaded(base, px, light_dir, strength):
    """A colour field lit from light_dir: brighter towards it, darker away (simple Lambert-like ramp)."""
    coords = np.linspace(-1 - 2 * MARGIN, 1 + 2 * MARGIN, px // 8)
    xx, yy = np.meshgrid(coords, coords)
    light = 1 + strength * (xx * light_dir[0] + yy * light_dir[1]) - 0.25 * strength * (xx**2 + yy**2)
    field = np.asarray(base, dtype=float)[None, None] * light[..., None]
    small = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))
    return np.asarray(small.resize((px, px), Image.Resampling.BILINEAR))


@dataclass
class Look:
    """A face's colours and light, drawn from the colours stream."""
    skin: tuple
    hair: tuple
    hair_name: str
    light_dir: tuple
    lighting: float
    long_hair: bool

    @property
    def beard_colour(self):
        return _mix(self.hair, (0, 0, 0), 0.15)


def _choose_look(labels, rng):
    pale, other = PALE_SKIN[rng.integers(len(PALE_SKIN))], SKIN_TONES[rng.integers(len(SKIN_TONES))]
    skin = _jitter(rng, tuple(pale if labels["pale_skin"] else other), 6)
    grey_when_old, red = rng.random() < 0.85, rng.random() < 0.2
    if labels["black_hair"]:
        hair_name = "black"
    elif labels["blond_hair"]:
        hair_name = "blond"
    elif not labels["young"] and grey_when_old:
        hair_name = "gray"
    else:
        hair_name = "red" if red else "brown"
    palette = HAIR[hair_name]
    hair = _jitter(rng, palette[int(rng.integers(6)) % len(palette)], 6)
    light_dir = (rng.uniform(-0.8, 0.8), rng.uniform(-0.6, 0.2))
    lighting = rng.uniform(0.15, 0.45)
    long_hair = rng.random() < 0.85 and not labels["male"] and not labels["bald"]
    return Look(skin, hair, hair_name, light_dir, lighting, long_hair)


def _paint_head(canvas, g, labels, look, rng):
    """Hair behind the head, neck and shoulders (the shirt's colour from `rng`), ears and the lit face;
    returns the face's mask."""
    skin, hair, long_hair, px, full = look.skin, look.hair, look.long_hair, canvas.px, canvas.full
    # Hair behind the head (long hair falls to the shoulders).
    if not labels["bald"]:
        bottom = g.chin_y + (0.12 if long_hair else -0.25)
        (x0, y0), (x1, y1) = canvas.xy([(g.cx - g.face_w * 1.25, g.top_y - 0.04), (g.cx + g.face_w * 1.25, bottom)])
        canvas.draw.rounded_rectangle([x0, y0, x1, y1], radius=int(0.12 * px), fill=hair)
    # Neck and shoulders.
    shirt = tuple(int(c) for c in rng.integers(20, 235, 3))
    canvas.polygon([(0.0, 1.0), (0.12, 0.93), (g.cx - g.jaw_w * 0.7, 0.9), (g.cx + g.jaw_w * 0.7, 0.9),
                    (0.88, 0.93), (1.0, 1.0)], shirt)
    canvas.polygon([(g.cx - g.jaw_w * 0.55, g.chin_y - 0.05), (g.cx + g.jaw_w * 0.55, g.chin_y - 0.05),
                    (g.cx + g.jaw_w * 0.6, 0.96), (g.cx - g.jaw_w * 0.6, 0.96)], _mix(skin, (0, 0, 0), 0.25))
    # Ears.
    for side in (-1, 1):
        canvas.ellipse(g.cx + side * g.face_w * 1.0, g.eye_y + 0.04, 0.03, 0.055, fill=_mix(skin, (0, 0, 0), 0.12))
    # The face, lit.
    outline = g.face_outline()
    face_mask = canvas.layer_mask(lambda d: d.polygon(canvas.xy(outline), fill=255))
    canvas.paste(_shaded(skin, full, look.light_dir, look.lighting), face_mask)
    return face_mask


def _paint_wrinkles(canvas, g, labels, look):
    # Wrinkles of age.
    line_colour = _mix(look.skin, (60, 30, 20), 0.5)
    if not labels["young"]:
        for k in range(3):
            y = g.hairline_y + 0.035 + 0.022 * k
            canvas.line(_curve((g.cx - 0.09, y), (g.cx, y - 0.012), (g.cx + 0.09, y)), line_colour, 0.006)
        for side in (-1, 1):
            x0 = g.cx + side * 0.035
            canvas.line(_curve((x0, g.nose_tip_y - 0.01), (x0 + side * 0.035, g.mouth_y - 0.03),
                               (x0 + side * 0.04, g.mouth_y + 0.03)), line_colour, 0.008)
            ex = g.cx + side * (g.eye_dx + g.eye_w + 0.01)
            for dy in (-0.012, 0.0, 0.012):
                canvas.line([(ex, g.eye_y + dy * 0.5), (ex + side * 0.025, g.eye_y + dy * 1.6)], line_colour, 0.005)
            bag_x = g.cx + side * g.eye_dx  # bags under the eyes
            canvas.line(_curve((bag_x - g.eye_w, g.eye_y + 0.03), (bag_x, g.eye_y + 0.05), (bag_x + g.eye_w, g.eye_y + 0.03)),
                        line_colour, 0.005)


def _paint_beard(canvas, g, labels, look, face_mask, rng):
    full = canvas.full
    # Beard: the jaw, chin and lower cheeks below the mouth line, textured.
    if labels["beard"]:
        jaw = g.jaw()
        top = g.mouth_y - 0.045
        region = [(g.cx - g.face_w * 0.98, g.eye_y + 0.07)] + [p for p in jaw[1:8]] + \
                 [(g.cx + g.face_w * 0.98, g.eye_y + 0.07), (g.cx + g.mouth_w * 1.1, top),
                  (g.cx - g.mouth_w * 1.1, top)]
        mask = canvas.layer_mask(lambda d: d.polygon(canvas.xy(region), fill=255))
        texture = (rng.random((full // 4, full // 4)) * 90 + 165).astype(np.uint8)
        texture = Image.fromarray(texture).resize((full, full), Image.Resampling.NEAREST)
        mask = Image.fromarray((np.asarray(mask, dtype=np.uint16) * np.asarray(texture) // 255).astype(np.uint8))
        mask = Image.fromarray(np.minimum(np.asarray(mask), np.asarray(face_mask)))
        canvas.paste(np.broadcast_to(np.array(look.beard_colour, dtype=np.uint8), (full, full, 3)).copy(), mask)


def _paint_eyes(canvas, g, labels, look, rng):
    skin, hair = look.skin, look.hair
    # Eyes and brows.
    eye_colour = EYE_COLOURS[rng.integers(len(EYE_COLOURS))]
    brow_w = 0.011 if labels["male"] else 0.006
    for side in (-1, 1):
        ex = g.cx + side * g.eye_dx
        canvas.ellipse(ex, g.eye_y, g.eye_w, g.eye_h, fill=(245, 245, 240), outline=_mix(skin, (0, 0, 0), 0.6),
                       w=0.004)
        canvas.ellipse(ex, g.eye_y, g.eye_h * 0.95, g.eye_h * 0.95, fill=eye_colour)
        canvas.ellipse(ex, g.eye_y, g.eye_h * 0.42, g.eye_h * 0.42, fill=(10, 10, 10))
        canvas.ellipse(ex + 0.004, g.eye_y - 0.004, 0.003, 0.003, fill=(255, 255, 255))
        inner, outer = ex - side * (g.eye_w + 0.005), ex + side * (g.eye_w + 0.012)
        canvas.line(_curve((inner, g.brow_y + 0.004), (ex, g.brow_y - 0.012), (outer, g.brow_y + 0.006)),
                    _mix(hair, (0, 0, 0), 0.3), brow_w)


def _paint_nose(canvas, g, look):
    """The nose; returns the height of its base."""
    skin = look.skin
    # Nose.
    nose_shade = _mix(skin, (40, 20, 10), 0.35)
    canvas.line(_curve((g.cx - 0.012, g.eye_y + 0.02), (g.cx - 0.02, g.nose_tip_y - 0.03), (g.cx - 0.016, g.nose_tip_y)),
                _mix(skin, (40, 20, 10), 0.2), 0.004)
    canvas.line(_curve((g.cx - 0.03, g.nose_tip_y + 0.005), (g.cx, g.nose_tip_y + 0.025),
                       (g.cx + 0.03, g.nose_tip_y + 0.005)), nose_shade, 0.005)
    for side in (-1, 1):
        canvas.ellipse(g.cx + side * 0.014, g.nose_tip_y + 0.012, 0.008, 0.005, fill=_mix(skin, (30, 10, 5), 0.55))
    nose_base_y = g.nose_tip_y + 0.022
    return nose_base_y


def _paint_mouth(canvas, g, labels, look):
    """The mouth; returns its corners and the heights of the lips."""
    lip = _mix(look.skin, (150, 40, 50), 0.45)
    # Mouth: a smile curves up and shows teeth; a neutral mouth is a flat pair of lips.
    ml, mr = (g.cx - g.mouth_w, g.mouth_y), (g.cx + g.mouth_w, g.mouth_y)
    if labels["smiling"]:
        ml, mr = (ml[0] - 0.02, ml[1] - 0.03), (mr[0] + 0.02, mr[1] - 0.03)
        upper = _curve(ml, (g.cx, g.mouth_y - 0.004), mr)
        lower = _curve(mr, (g.cx, g.mouth_y + 0.1), ml)
        canvas.polygon(upper + lower, (70, 20, 25))
        teeth = _curve(ml, (g.cx, g.mouth_y - 0.004), mr) + _curve(mr, (g.cx, g.mouth_y + 0.045), ml)
        canvas.polygon(teeth, (245, 242, 230))
        canvas.line(upper, lip, 0.006)
        canvas.line(lower, lip, 0.008)
        upper_lip_y, lower_lip_y = g.mouth_y - 0.02, g.mouth_y + 0.04
    else:
        canvas.polygon(_curve(ml, (g.cx, g.mouth_y - 0.02), mr) + _curve(mr, (g.cx, g.mouth_y + 0.028), ml), lip)
        canvas.line(_curve(ml, (g.cx, g.mouth_y + 0.004), mr), _mix(lip, (0, 0, 0), 0.45), 0.004)
        upper_lip_y, lower_lip_y = g.mouth_y - 0.011, g.mouth_y + 0.014
    return ml, mr, upper_lip_y, lower_lip_y


def _paint_mustache(canvas, g, labels, look, nose_base_y, mouth):
    ml, mr, upper_lip_y, _ = mouth
    # Mustache between the nose base and the upper lip.
    if labels["mustache"]:
        top_y, low_y = nose_base_y + 0.004, upper_lip_y - 0.002
        shape = _curve((ml[0] - 0.008, low_y + 0.012), (g.cx, top_y - 0.012), (mr[0] + 0.008, low_y + 0.012)) + \
                _curve((mr[0] + 0.004, low_y + 0.014), (g.cx, low_y - 0.004), (ml[0] - 0.004, low_y + 0.014))
        canvas.polygon(shape, _mix(look.beard_colour, (0, 0, 0), 0.1))


def _paint_hair(canvas, g, labels, look, rng):
    """The hairline, bangs or a bald crown, and strands (from `rng`); returns the hairline's three points."""
    skin, hair = look.skin, look.hair
    # Hair in front: the hairline, optional bangs, or a bald crown with side hair.
    if labels["bald"]:
        for side in (-1, 1):
            x = g.cx + side * g.face_w * 0.98
            canvas.polygon([(x, g.eye_y - 0.09), (x + side * 0.03, g.eye_y - 0.07), (x + side * 0.03, g.eye_y + 0.05),
                            (x - side * 0.012, g.eye_y + 0.04)], hair)
        canvas.ellipse(g.cx - 0.06, g.top_y + 0.05, 0.05, 0.025, fill=_mix(skin, (255, 255, 255), 0.35))
        hairline = [(g.cx - g.face_w * 0.9, g.eye_y - 0.09), (g.cx, g.top_y), (g.cx + g.face_w * 0.9, g.eye_y - 0.09)]
    else:
        line_y = g.hairline_y
        crown = [(g.cx - g.face_w * 1.08, g.eye_y - 0.02)] + \
                _curve((g.cx - g.face_w * 1.08, g.top_y + 0.02), (g.cx, g.top_y - 0.1), (g.cx + g.face_w * 1.08, g.top_y + 0.02)) + \
                [(g.cx + g.face_w * 1.08, g.eye_y - 0.02), (g.cx + g.face_w * 0.95, g.eye_y - 0.03)] + \
                _curve((g.cx + g.face_w * 0.9, line_y + 0.03), (g.cx, line_y - 0.04), (g.cx - g.face_w * 0.9, line_y + 0.03)) + \
                [(g.cx - g.face_w * 0.95, g.eye_y - 0.03)]
        canvas.polygon(crown, hair)
        hairline = [(g.cx - g.face_w * 0.9, line_y + 0.03), (g.cx, line_y - 0.005), (g.cx + g.face_w * 0.9, line_y + 0.03)]
        if labels["bangs"]:
            fringe_y = g.brow_y - 0.02
            strands = [(g.cx - g.face_w * 0.95, line_y)]
            for k in range(9):
                x = g.cx - g.face_w * 0.9 + k * g.face_w * 1.8 / 8
                strands += [(x - 0.015, fringe_y - 0.012 * (k % 2)), (x + 0.005, fringe_y - 0.03)]
            strands += [(g.cx + g.face_w * 0.95, line_y), (g.cx, line_y - 0.05)]
            canvas.polygon(strands, _mix(hair, (255, 255, 255), 0.05))
            hairline = [(g.cx - g.face_w * 0.9, fringe_y), (g.cx, fringe_y), (g.cx + g.face_w * 0.9, fringe_y)]
    if not labels["bald"] and look.hair_name != "black":
        for k in range(14):  # strands for texture
            x = g.cx + rng.uniform(-0.8, 0.8) * g.face_w
            canvas.line(_curve((x, g.top_y + 0.02), (x + rng.uniform(-0.03, 0.03), g.top_y + 0.05),
                               (x + rng.uniform(-0.04, 0.04), g.hairline_y)), _mix(hair, (0, 0, 0), 0.2), 0.003)
    return hairline


def _paint_eyeglasses(canvas, g, labels, rng):
    px, full = canvas.px, canvas.full
    # Eyeglasses: two frames, a bridge and the temples, with a faint lens tint.
    if labels["eyeglasses"]:
        frame = tuple(int(c) for c in rng.choice([(20, 20, 20), (90, 60, 30), (150, 150, 160), (120, 20, 30)]))
        rx, ry = g.eye_w + 0.022, g.eye_h + 0.025
        round_frames = rng.random() < 0.4
        for side in (-1, 1):
            ex = g.cx + side * g.eye_dx
            box = canvas.box(ex, g.eye_y + 0.004, rx, ry)
            lens = canvas.layer_mask(lambda d: d.rounded_rectangle(box, radius=int(ry * px * (1 if round_frames else 0.4)),
                                                                   fill=60))
            canvas.paste(np.full((full, full, 3), 225, dtype=np.uint8), lens)
            canvas.draw.rounded_rectangle(box, radius=int(ry * px * (1 if round_frames else 0.4)), outline=frame,
                                          width=canvas.width(0.007))
            canvas.line([(ex + side * rx, g.eye_y - 0.005), (g.cx + side * g.face_w * 1.0, g.eye_y - 0.01)], frame, 0.006)
        canvas.line(_curve((g.cx - g.eye_dx + rx, g.eye_y - 0.004), (g.cx, g.eye_y - 0.02),
                           (g.cx + g.eye_dx - rx, g.eye_y - 0.004)), frame, 0.006)


def _paint_hat(canvas, g, labels, rng, hairline):
    """A hat (its colour and height from `rng`); returns the hairline, now at the brim when there is one."""
    px = canvas.px
    # Hat: a crown over the head and a brim at the forehead.
    if labels["wearing_hat"]:
        hat = tuple(int(c) for c in rng.integers(20, 235, 3))
        brim_y = g.hairline_y + rng.uniform(-0.01, 0.02)
        canvas.draw.chord(canvas.box(g.cx, brim_y, g.face_w * 1.18, brim_y - g.top_y + 0.09), 180, 360, fill=hat)
        canvas.draw.rounded_rectangle(canvas.box(g.cx, brim_y, g.face_w * 1.3, 0.022), radius=int(0.02 * px),
                                      fill=_mix(hat, (0, 0, 0), 0.3))
        hairline = [(g.cx - g.face_w * 0.9, brim_y + 0.02), (g.cx, brim_y + 0.02), (g.cx + g.face_w * 0.9, brim_y + 0.02)]
    return hairline


def _landmarks(g, nose_base_y, mouth, hairline):
    ml, mr, upper_lip_y, lower_lip_y = mouth
    return {
        "left_eye": (g.cx - g.eye_dx, g.eye_y), "right_eye": (g.cx + g.eye_dx, g.eye_y),
        "left_eye_outer": (g.cx - g.eye_dx - g.eye_w, g.eye_y), "left_eye_inner": (g.cx - g.eye_dx + g.eye_w, g.eye_y),
        "right_eye_inner": (g.cx + g.eye_dx - g.eye_w, g.eye_y), "right_eye_outer": (g.cx + g.eye_dx + g.eye_w, g.eye_y),
        "left_brow_outer": (g.cx - g.eye_dx - g.eye_w - 0.012, g.brow_y + 0.006),
        "left_brow_inner": (g.cx - g.eye_dx + g.eye_w + 0.005, g.brow_y + 0.004),
        "right_brow_inner": (g.cx + g.eye_dx - g.eye_w - 0.005, g.brow_y + 0.004),
        "right_brow_outer": (g.cx + g.eye_dx + g.eye_w + 0.012, g.brow_y + 0.006),
        "nose_tip": (g.cx, g.nose_tip_y), "nose_base": (g.cx, nose_base_y),
        "mouth_left": ml, "mouth_right": mr, "upper_lip": (g.cx, upper_lip_y), "lower_lip": (g.cx, lower_lip_y),
        **{f"jaw_{i}": p for i, p in enumerate(g.jaw())},
        "hairline_left": hairline[0], "hairline_center": hairline[1], "hairline_right": hairline[2],
    }


def _apply_nuisance(canvas, size, landmarks, rng):
    """Head size, position and a small rotation (from `rng`), applied to pixels and landmarks alike, then
    blur and noise: (uint8 (size, size, 3), {landmark: (x, y) in pixels})."""
    px = canvas.px
    angle = math.radians(rng.normal(0, 3))
    scale = rng.uniform(0.93, 1.07)
    shift = rng.normal(0, 0.015, 2)
    a, b = scale * math.cos(angle), scale * math.sin(angle)

    def forward(p):  # canonical [0,1] -> output [0,1], about the centre
        x, y = p[0] - 0.5, p[1] - 0.5
        return (0.5 + a * x - b * y + shift[0], 0.5 + b * x + a * y + shift[1])

    # PIL's affine maps output pixels to input pixels: invert the similarity about the frame's centre,
    # then crop the frame out of the margins.
    det = a * a + b * b
    ia, ib = a / det, b / det
    centre = canvas.offset + 0.5 * px
    cxo, cyo = centre + shift[0] * px, centre + shift[1] * px
    coeffs = (ia, ib, centre - ia * cxo - ib * cyo, -ib, ia, centre + ib * cxo - ia * cyo)
    image = canvas.image.transform(canvas.image.size, Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)
    image = image.crop((int(canvas.offset), int(canvas.offset), int(canvas.offset) + px, int(canvas.offset) + px))
    image = image.resize((size, size), Image.Resampling.LANCZOS)
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 0.7) * size / 128))
    noise_level = rng.uniform(0.5, 2.5)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, noise_level, (size, size, 3))
    pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    points = {name: tuple(float(v) * size for v in forward(p)) for name, p in landmarks.items()}
    return pixels, points


def render_face(seed, size=128, labels=None, label_distribution="celeba"):
    """Render one face: (uint8 (size, size, 3), {attribute: bool}, {landmark: (x, y) in pixels}).
    Without `labels`, they are drawn from LABEL_DISTRIBUTIONS[label_distribution]."""
    # One random stream per concern, so that changing one attribute changes only what it draws.
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(len(STREAMS))]
    labels_rng, geometry_rng, colours_rng, beard_rng, glasses_rng, hat_rng, hair_rng, nuisance_rng = streams
    labels = dict(LABEL_DISTRIBUTIONS[label_distribution](labels_rng) if labels is None else labels)
    g = FaceGeometry(geometry_rng, labels)
    canvas = Canvas(size, colours_rng)
    # Every colour is drawn whatever the labels, so that the colours of a seed stay put when a label flips.
    look = _choose_look(labels, colours_rng)
    face_mask = _paint_head(canvas, g, labels, look, colours_rng)
    _paint_wrinkles(canvas, g, labels, look)
    _paint_beard(canvas, g, labels, look, face_mask, beard_rng)
    _paint_eyes(canvas, g, labels, look, colours_rng)
    nose_base_y = _paint_nose(canvas, g, look)
    mouth = _paint_mouth(canvas, g, labels, look)
    _paint_mustache(canvas, g, labels, look, nose_base_y, mouth)
    hairline = _paint_hair(canvas, g, labels, look, hair_rng)
    _paint_eyeglasses(canvas, g, labels, glasses_rng)
    hairline = _paint_hat(canvas, g, labels, hat_rng, hairline)
    pixels, points = _apply_nuisance(canvas, size, _landmarks(g, nose_base_y, mouth, hairline), nuisance_rng)
    return pixels, {k: bool(labels[k]) for k in DEFAULT_ATTRIBUTES}, points


def _render_to_file(job):
    seed, size, label_distribution, path = job
    pixels, labels, points = render_face(seed, size, label_distribution=label_distribution)
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="JPEG" if path.suffix == ".jpg" else "PNG", quality=95)
    return labels, points


def write_dataset(out, count, *, size=128, seed=0, workers=None, progress=None, label_distribution="celeba",
                  overwrite=False):
    """Render `count` faces into a CelebA-layout folder (new or empty, or a data set with `overwrite`);
    returns the folder.

    img_align_celeba/NNNNNN.jpg, list_attr_celeba.txt (CelebA's columns), list_landmarks.txt
    (our landmark names, pixel coordinates) and list_eval_partition.txt (90% / 5% / 5%).
    Face i is render_face(seed + i, size, label_distribution=...), so any subset can be re-rendered exactly.
    """
    if label_distribution not in LABEL_DISTRIBUTIONS:
        raise FacegenError(f"unknown label distribution {label_distribution!r}; use "
                           f"{' or '.join(LABEL_DISTRIBUTIONS)}")
    check_replaceable_folder(out, layout.ATTRIBUTE_FILE, "a data set", overwrite)
    out = Path(out)
    (out / "img_align_celeba").mkdir(parents=True, exist_ok=True)
    jobs = [(seed + i, size, label_distribution, out / "img_align_celeba" / f"{i + 1:06d}.jpg")
            for i in range(count)]
    workers = workers or os.cpu_count() or 1
    results = []
    task = progress.add_task("rendering", total=count) if progress else None
    with ProcessPoolExecutor(workers) as pool:
        for result in pool.map(_render_to_file, jobs, chunksize=64):
            results.append(result)
            if progress:
                progress.advance(task)
    columns = [celeba_column(a) for a in DEFAULT_ATTRIBUTES]
    rows = []
    for i, ((*_, path), (labels, points)) in enumerate(zip(jobs, results)):
        values = [(-1 if labels[a] else 1) if inverted else (1 if labels[a] else -1)
                  for a, (_, inverted) in zip(DEFAULT_ATTRIBUTES, columns)]
        rows.append((path.name, values, 0 if i % 20 < 18 else (1 if i % 20 == 18 else 2), points))
    layout.write_layout(out, [c for c, _ in columns], rows, landmark_names=LANDMARK_NAMES)
    return out
