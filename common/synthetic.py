"""Small procedurally generated datasets in the real on-disk formats, so every loader runs unchanged on them.

    python -m common.synthetic OUT [--only gta5,synthia,cityscapes,coco,mot17,mots20,youtube_vis,imagenet]
                                   [--seed 0] [--images N] [--size WxH]

writes OUT/<name>/ for each selected set (all by default; `make data` writes data/synthetic/). The same seed gives
the same bytes; each item draws from its own random stream (seed, set, split, index), so changing a count never
changes the other items. --images N sets the training images of the segmentation sets (default 200) and scales
every other count by N / 200 (MOT17 and MOTS20 keep their two sequences and scale their length); --size WxH
replaces every default size. An existing OUT/<name>/ is replaced only if this module wrote it (its .synthetic
marker file). Python: `write(out, only, seed, images, size)`.

Layouts (defaults in brackets):

gta5/         images/00001.png (RGB) and labels/00001.png: 8-bit 'P' (palette) PNG whose indices are Cityscapes
              label ids, with the Cityscapes colours as palette, as GTA5's. [200 scenes, 160x88, "game" look]
synthia/      RGB/0000000.png (8-bit RGB) and GT/LABELS/0000000.png: PNG bit depth 16, colour type 2 (RGB), i.e.
              three big-endian uint16 channels: SYNTHIA class id, instance id (persons, riders, cars, buses,
              bicycles; 0 elsewhere), 0. Written by `write_png16` (PIL cannot write it). PIL (Pillow 13) opens it as
              8-bit 'RGB' keeping only the high byte, so every id reads as 0: read it with torchvision's
              `decode_png(..., ImageReadMode.UNCHANGED)` (common/segmentation.py), imageio's PNG-FI, or OpenCV's
              IMREAD_UNCHANGED. [200 scenes, 128x76, "game" look]
cityscapes/   leftImg8bit/{train,val}/<city>/<city>_<seq:06d>_000019_leftImg8bit.png (RGB) and
              gtFine/{train,val}/<city>/<city>_<seq:06d>_000019_gtFine_labelIds.png (8-bit 'L', label ids); train
              cities aachen, bochum, bremen, cologne; val frankfurt, lindau, munster. [200 + 50, 128x64, "real" look]
coco/         annotations/instances_{train,val}2017.json and {train,val}2017/<12-digit id>.jpg. Six shape
              categories with sparse COCO-style ids (2 disc, 7 square, 15 triangle, 33 star, 58 cross, 90 hexagon):
              2-6 objects per image, polygons (iscrowd 0), sometimes one iscrowd 1 group of small discs with
              uncompressed RLE; bbox = tight box of the rasterised mask, area = its pixel count; objects overlap by at
              most 15 % of their area and masks are the whole shape. The background is 2-3 regions of COCO panoptic
              stuff classes (187 sky-other-merged or 171 wall-brick above a wavy horizon; 193 grass-merged, 154 sand,
              155 sea, 149 road below), each with its own texture. COCO panoptic in the same folder:
              annotations/panoptic_{train,val}2017.json (images, categories with isthing and color, annotations with
              segments_info [{id, category_id, iscrowd, bbox, area}]) and panoptic_{train,val}2017/<12-digit id>.png
              (RGB, segment id = R + 256 G + 256^2 B; visible pixels, one segment per stuff class, a 1-pixel void
              band along stuff boundaries). [200 + 50 images, 112-160 x 96-128]
mot17/        train/MOT17-02-FRCNN, train/MOT17-04-FRCNN: seqinfo.ini ([Sequence] name, imDir=img1, frameRate=30,
              seqLength, imWidth, imHeight, imExt=.jpg), img1/000001.jpg..., gt/gt.txt rows
              `frame,id,left,top,width,height,flag,class,visibility` (1-based integer pixels, sorted by id then frame;
              class 1 pedestrians with flag 1; a standing person class 7, a mannequin class 8 and a window reflection
              class 12, flag 0; boxes may extend past the image border as MOT17's; visibility = share of the box not
              covered by nearer boxes nor cut by the border), det/det.txt rows `frame,-1,left,top,width,height,
              score,-1,-1,-1` (noisy detections with misses and false positives). [2 x 100 frames, 160x128]
mots20/       train/MOTS20-02, train/MOTS20-04: the frames of the mot17 sequences of the same number, seqinfo.ini,
              img1/, gt/gt.txt in the KITTI-MOTS format `frame id class height width rle` (space-separated; id 2000
              + pedestrian id, class 2; one class-10 ignore region, id 10000, per frame over the standing person,
              mannequin and reflection; masks = visible pixels, pycocotools RLE strings). [2 x 100 frames, 160x128]
youtube_vis/  train/JPEGImages/<video>/00000.jpg, 00005.jpg, ... and train.json (videos: id, width, height, length,
              file_names; annotations: id, video_id, category_id, iscrowd 0, segmentations = per-frame uncompressed
              RLE {size, counts} or null, bboxes [x, y, w, h] or null, areas or null; categories with ids in 1..40:
              3 disc, 9 square, 17 triangle, 26 star, 40 cross). The held-out split for local evaluation is
              valid_holdout.json in the same format; its frames are in the same train/JPEGImages folder. Masks are
              the visible pixels (later instances occlude earlier ones). [60 + 30 videos of 8-12 frames, 128x96]
imagenet/     train/<wnid>/<wnid>_<k>.JPEG and val/<wnid>/ILSVRC2012_val_<8 digits>.JPEG; six made-up wnids
              n09000001..n09000006 = disc, square, triangle, star, cross, hexagon: one large shape over a textured
              background with small shapes of other classes as clutter. [60 + 20 per class, 64x64]

Street scenes (gta5, synthia, cityscapes). One layout generator draws a one-point-perspective street: sky, facades
(buildings with windows, vegetation masses, walls, fences, billboards), terrain strips, sidewalks, road with lane
markings, parking strips, and objects far to near: trees, poles with traffic signs or lights, cars, buses, persons,
riders on bicycles, static street furniture, ground clutter. Cityscapes ids used: 7 road, 8 sidewalk, 11 building,
12 wall, 13 fence, 17 pole, 19 traffic light, 20 traffic sign, 21 vegetation, 22 terrain, 23 sky, 24 person,
25 rider, 26 car, 28 bus, 33 bicycle, and the ignored 0 unlabeled, 4 static, 9 parking. SYNTHIA ids: 1 sky,
2 building, 3 road, 4 sidewalk, 5 fence, 6 vegetation, 7 pole, 8 car, 9 sign, 10 person, 11 bicycle, 15 light,
16 terrain, 17 rider, 19 bus, 21 wall, and the ignored 0 void, 13 parking-slot, 22 lanemarking (lane markings are
road in GTA5/Cityscapes, lanemarking in SYNTHIA, as in the real sets). Source and target scenes are independent
draws from the same generator with each domain's priors (STREET_DOMAINS), so the target differs from the source in
what the adaptation papers adapt, not only in a global colour transform that BatchNorm statistics undo:

  appearance, per class: Cityscapes colours move APPEARANCE_SHIFT of the way to a Cityscapes-like look for some
      classes (grey concrete buildings and walls, grey paving, dry olive terrain, dark foliage, grey / black / white
      cars, dark clothes, white / yellow buses) while road, sky and lane markings keep theirs; dark-grey windows
      instead of reflective light-blue ones; half-overcast sky.
  texture: asphalt grain and patches, paving joints, brick courses, leaf and grass speckle (the game look is flat).
  layout and viewpoint: the ego vehicle's bonnet over the bottom 7-13 % (Cityscapes id 1, ignored), the horizon
      higher (30-42 % of the height instead of 36-48 %), objects 0.8x the size, more cars and persons, fewer buses
      (SYNTHIA: horizon at 22-36 %, objects 0.85x, as its higher viewpoint).
  global ("real" REAL_STYLE against "game" GAME_STYLE): desaturated to 70 %, darkened to 95 %, tinted
      (RGB x 0.95, 1.0, 1.08), exposure 85-100 %, vignette 0.2, Gaussian blur (sigma 0.8 px at 64 px height),
      noise sigma 7 instead of 2.

What this gap is for a small DeepLab-v2 (source-only, BatchNorm statistics only, each adaptation method, oracle) is
measured in docs/advent.md and docs/adaptsegnet.md (the demos' tables).
"""
import argparse
import json
import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# ---------------------------------------------------------------------------------------------------------------------
# Helpers: per-item random streams, noise, PNG writers
# ---------------------------------------------------------------------------------------------------------------------

FORMATS = ("gta5", "synthia", "cityscapes", "coco", "mot17", "mots20", "youtube_vis", "imagenet")


def item_rng(seed, *keys):
    """Independent stream per (seed, format, split, index): changing one count never changes other items."""
    words = [seed] + [k if isinstance(k, int) else zlib.crc32(k.encode()) for k in keys]
    return np.random.default_rng(words)


def value_noise(rng, height, width, cell):
    """Smooth noise in [-1, 1]: a random grid with one value per `cell` pixels, bicubically upsampled."""
    gh, gw = max(2, int(np.ceil(height / cell)) + 1), max(2, int(np.ceil(width / cell)) + 1)
    grid = Image.fromarray(rng.uniform(-1, 1, (gh, gw)).astype(np.float32), mode="F")
    big = np.asarray(grid.resize((gw * cell, gh * cell), Image.BICUBIC))
    return np.clip(big[:height, :width], -1.0, 1.0)


def write_png16(path, array):
    """Write a uint16 [H, W, 3] array as a 16-bit RGB PNG (bit depth 16, colour type 2, big-endian samples).

    PIL cannot write 16-bit multi-channel PNGs, so this is the format by hand: signature, IHDR, one zlib IDAT of
    rows each prefixed by filter byte 0 (None), IEND; every chunk carries its CRC-32.
    """
    array = np.ascontiguousarray(array, dtype=">u2")
    height, width, channels = array.shape
    assert channels == 3, f"expected [H, W, 3] uint16, got {array.shape}"
    raw = b"".join(b"\x00" + array[y].tobytes() for y in range(height))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 6))
                           + chunk(b"IEND", b""))


def to_uint8(img):
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def parse_size(text):
    w, h = (int(v) for v in text.lower().split("x"))
    assert w >= 16 and h >= 16, f"--size must be at least 16x16, got {text}"
    return w, h


# ---------------------------------------------------------------------------------------------------------------------
# Street scenes: one layout generator, two renderings ("game" for GTA5/SYNTHIA, "real" for Cityscapes)
# ---------------------------------------------------------------------------------------------------------------------

# Scene class -> (Cityscapes label id, SYNTHIA class id). Ids that map to ignore in the 19-class tables:
# Cityscapes 0 unlabeled, 1 ego vehicle, 4 static, 9 parking; SYNTHIA 0 void, 13 parking-slot, 22 lanemarking.
STREET_CLASSES = {
    "unlabeled": (0, 0), "ego": (1, 0), "static": (4, 0), "parking": (9, 13), "road": (7, 3), "lane": (7, 22),
    "sidewalk": (8, 4), "building": (11, 2), "wall": (12, 21), "fence": (13, 5), "pole": (17, 7),
    "light": (19, 15), "sign": (20, 9), "vegetation": (21, 6), "terrain": (22, 16), "sky": (23, 1),
    "person": (24, 10), "rider": (25, 17), "car": (26, 8), "bus": (28, 19), "bicycle": (33, 11),
}
DYNAMIC = {"person", "rider", "car", "bus", "bicycle"}  # SYNTHIA writes an instance id for these (channel 1)

# "Game" colours (RGB) per scene class; an instance draws one and jitters it (GTA5, SYNTHIA; also MOT17's people).
GAME_COLOURS = {
    "sky": [(95, 155, 235)], "building": [(175, 120, 95), (200, 190, 170), (135, 135, 145), (215, 175, 120)],
    "wall": [(185, 175, 150), (160, 150, 135)], "fence": [(155, 125, 85), (115, 115, 120)],
    "road": [(95, 95, 102)], "lane": [(235, 235, 230)], "sidewalk": [(190, 160, 175), (178, 176, 170)],
    "parking": [(150, 130, 160)], "terrain": [(160, 200, 95)], "vegetation": [(55, 140, 45), (80, 155, 40)],
    "pole": [(130, 130, 135)], "sign": [(240, 205, 30), (220, 40, 40), (40, 95, 210)], "light": [(45, 45, 50)],
    "car": [(205, 30, 30), (30, 65, 205), (238, 238, 238), (35, 35, 35), (165, 170, 175), (235, 185, 20)],
    "bus": [(235, 125, 20), (40, 125, 205)], "static": [(115, 85, 60), (95, 115, 95)],
    "unlabeled": [(125, 100, 90)], "bicycle": [(30, 30, 30)],
    "clothes": [(200, 40, 40), (40, 60, 180), (230, 230, 60), (40, 150, 60), (240, 240, 240), (30, 30, 30),
                (150, 80, 160)],
    "skin": [(235, 190, 160), (190, 140, 100), (120, 80, 55)],
}
# "Real" colours (Cityscapes) per scene class, before REAL_STYLE's global transform: a class-conditional shift
# that no per-channel normalisation undoes. Each colour moves APPEARANCE_SHIFT of the way from the game colour to
# the one below; road, sky, lane, light and skin keep their game colours, the others move towards a neighbour's:
# grey concrete buildings and walls, grey paving instead of pink, dry olive terrain instead of bright grass, dark
# foliage, grey / black / white cars, dark clothes, white / yellow buses.
APPEARANCE_SHIFT = 0.5
CITY_LOOK = {
    "building": [(125, 118, 112), (160, 150, 135), (100, 96, 94), (175, 165, 150)],
    "wall": [(135, 135, 128), (155, 145, 125)], "fence": [(100, 104, 98), (130, 115, 92)],
    "sidewalk": [(150, 142, 140), (138, 138, 132)], "parking": [(128, 120, 125)],
    "terrain": [(140, 135, 85), (125, 130, 80)], "vegetation": [(62, 95, 45), (50, 80, 40)],
    "pole": [(95, 95, 92)], "sign": [(210, 190, 60), (185, 55, 50), (55, 90, 170)],
    "car": [(60, 60, 66), (150, 150, 156), (215, 215, 215), (35, 40, 62), (110, 110, 116), (120, 38, 38)],
    "bus": [(225, 220, 205), (205, 175, 45)], "bicycle": [(45, 45, 45)], "ego": [(30, 30, 34)],
    "clothes": [(45, 45, 55), (85, 75, 65), (60, 62, 95), (145, 145, 145), (30, 30, 30), (115, 50, 50),
                (70, 88, 70)],
}
REAL_COLOURS = {**GAME_COLOURS, "ego": CITY_LOOK["ego"], **{
    cls: [tuple((1 - APPEARANCE_SHIFT) * g + APPEARANCE_SHIFT * r for g, r in zip(GAME_COLOURS[cls][i % len(
        GAME_COLOURS[cls])], look[i % len(look)])) for i in range(max(len(look), len(GAME_COLOURS[cls])))]
    for cls, look in CITY_LOOK.items() if cls != "ego"}}

# Scene priors per domain (the camera and what a city looks like), so the target also differs in layout, object
# scale and viewpoint: horizon = the horizon's row range as a fraction of the height; scale multiplies every
# object's size; cars / persons / trees / poles = count ranges (numpy integers, high exclusive); bus / rider =
# probability of one; hood = height range of the ego vehicle's bonnet at the bottom (Cityscapes' id 1, ignored).
STREET_DOMAINS = {
    "gta5": dict(palette=GAME_COLOURS, horizon=(0.36, 0.48), scale=1.0, cars=(1, 6), persons=(0, 6), trees=(1, 5),
                 poles=(1, 4), bus=0.15, rider=0.25, hood=None),
    "synthia": dict(palette=GAME_COLOURS, horizon=(0.22, 0.36), scale=0.85, cars=(1, 6), persons=(0, 6),
                    trees=(1, 5), poles=(1, 4), bus=0.15, rider=0.25, hood=None),
    "cityscapes": dict(palette=REAL_COLOURS, horizon=(0.30, 0.42), scale=0.8, cars=(2, 8), persons=(1, 7),
                       trees=(2, 6), poles=(2, 5), bus=0.08, rider=0.35, hood=(0.07, 0.13)),
}

# The controlled appearance shift (documented in the module docstring; the gap it gives: docs/adaptsegnet.md).
GAME_STYLE = dict(saturation=1.0, brightness=1.0, cast=(1.0, 1.0, 1.0), blur=0.0, noise=2.0, textures=False,
                  exposure=(0.95, 1.05), vignette=0.0)
REAL_STYLE = dict(saturation=0.7, brightness=0.95, cast=(0.95, 1.0, 1.08), blur=0.8, noise=7.0, textures=True,
                  exposure=(0.85, 1.0), vignette=0.2)


class StreetCanvas:
    """A scene drawn as a material-index map (PIL 'L'): each material has a class, a colour and an instance id."""

    def __init__(self, width, height):
        self.width, self.height = width, height
        self.image = Image.new("L", (width, height), 0)
        self.draw = ImageDraw.Draw(self.image)
        self.materials = []  # (scene class, game RGB, instance id)

    def material(self, cls, colour, instance=0):
        assert len(self.materials) < 256, "too many materials in one scene"
        self.materials.append((cls, tuple(float(c) for c in colour), instance))
        return len(self.materials) - 1

    def polygon(self, points, m):
        self.draw.polygon([(float(x), float(y)) for x, y in points], fill=m)

    def rect(self, x0, y0, x1, y1, m):
        self.draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], fill=m)

    def ellipse(self, cx, cy, rx, ry, m, width=0):
        box = [cx - rx, cy - ry, cx + rx, cy + ry]
        if width:
            self.draw.ellipse(box, outline=m, width=width)
        else:
            self.draw.ellipse(box, fill=m)


def _colour(rng, cls, jitter=12.0, palette=GAME_COLOURS):
    base = np.array(palette[cls][rng.integers(len(palette[cls]))], float)
    return np.clip(base + rng.normal(0, jitter, 3), 0, 255)


def street_scene(rng, width, height, domain="gta5"):
    """Draw one street layout of `domain` (STREET_DOMAINS: its palette, camera and scene priors): sky, facades along
    a one-point-perspective street, road, sidewalks, objects, and the ego vehicle's bonnet where the domain has one.

    Geometry: horizon at y_h, vanishing point (v_x, y_h); a point at street depth d (0 at the horizon, 1 at the
    bottom row, > 1 nearer than the bottom row) lies at y = y_h + (H - y_h) d, and the street's lines run to the
    vanishing point. Objects scale with d and are drawn far to near, so near ones occlude far ones.
    """
    prior = STREET_DOMAINS[domain]
    c = StreetCanvas(width, height)
    W, H = float(width), float(height)
    k = prior["scale"]

    def col(cls, jitter=12.0):
        return _colour(rng, cls, jitter, prior["palette"])

    yh = H * rng.uniform(*prior["horizon"])
    vx = W * rng.uniform(0.35, 0.65)
    road = W * rng.uniform(0.42, 0.7)  # half road width at the bottom row
    walk = W * rng.uniform(0.18, 0.35)  # sidewalk width at the bottom row
    grass = [W * rng.uniform(0.1, 0.3) if rng.random() < 0.4 else 0.0 for _ in range(2)]  # terrain strip per side

    def ybot(d):
        return yh + (H - yh) * d

    def xat(offset, d, side):  # x of a line `offset` from the street centre (at the bottom row), at depth d
        return vx + side * offset * d

    c.material("sky", col("sky", 6))
    # Far skyline around the vanishing point.
    for _ in range(rng.integers(2, 6)):
        cls = "building" if rng.random() < 0.75 else "vegetation"
        x0 = vx + rng.uniform(-0.25, 0.2) * W
        c.rect(x0, yh - rng.uniform(0.03, 0.14) * H, x0 + rng.uniform(0.04, 0.12) * W, yh + 1,
               c.material(cls, col(cls)))
    # Facades: per side, blocks between depth cuts; a block is a building, a vegetation mass, or a low wall/fence
    # (with sky or a building behind it).
    for s, side in enumerate((-1, 1)):
        far_edge = road + walk + grass[s]
        d_max = 1.1 * max(vx if side < 0 else W - vx, 1.0) / far_edge + 0.05
        cuts = np.sort(np.exp(rng.uniform(np.log(0.04), np.log(d_max), rng.integers(2, 5))))
        cuts = np.concatenate([[0.01], cuts, [d_max * 1.5]])
        for da, db in zip(cuts[:-1], cuts[1:]):
            kind = rng.choice(["building", "vegetation", "wall", "fence"], p=[0.64, 0.14, 0.11, 0.11])
            xa, xb = xat(far_edge, da, side), xat(far_edge, db, side)
            tall = kind in ("building", "vegetation") or rng.random() < 0.6
            if tall:
                cls = "vegetation" if kind == "vegetation" else "building"
                hb = rng.uniform(0.7, 2.5) * H if cls == "building" else rng.uniform(0.4, 0.9) * H
                c.polygon([(xa, ybot(da) - hb * da), (xb, ybot(db) - hb * db), (xb, H * 4), (xa, H * 4)],
                          c.material(cls, col(cls)))
            if kind in ("wall", "fence"):
                hf = rng.uniform(0.12, 0.3) * H
                c.polygon([(xa, ybot(da) - hf * da), (xb, ybot(db) - hf * db), (xb, H * 4), (xa, H * 4)],
                          c.material(kind, col(kind)))
            if kind == "building" and rng.random() < 0.3:  # a billboard/awning: "static", ignored in training
                dm, dw = rng.uniform(da, db), rng.uniform(0.1, 0.3) * (db - da)
                y0 = ybot(dm) - rng.uniform(0.3, 0.6) * H * dm
                c.polygon([(xat(far_edge, dm, side), y0), (xat(far_edge, dm + dw, side), y0 - 0.02 * H),
                           (xat(far_edge, dm + dw, side), y0 + 0.15 * H * (dm + dw)),
                           (xat(far_edge, dm, side), y0 + 0.15 * H * dm)], c.material("static", col("static")))
        if grass[s]:
            c.polygon([(vx, yh), (xat(road + walk, 4, side), ybot(4)), (xat(far_edge, 4, side), ybot(4))],
                      c.material("terrain", col("terrain")))
    # Ground: sidewalks, road, lane markings, parking strips.
    for side in (-1, 1):
        c.polygon([(vx, yh), (xat(road, 4, side), ybot(4)), (xat(road + walk, 4, side), ybot(4))],
                  c.material("sidewalk", col("sidewalk")))
    c.polygon([(vx, yh), (xat(road, 4, -1), ybot(4)), (xat(road, 4, 1), ybot(4))],
              c.material("road", col("road", 6)))
    lane = c.material("lane", col("lane", 4))
    dash, lane_x = rng.uniform(0.06, 0.12), rng.uniform(-0.1, 0.1) * road
    for d0 in np.arange(rng.uniform(0.02, 0.1), 2.0, 2.2 * dash):
        d1, lw = d0 + dash, 0.012 * W
        c.polygon([(vx + lane_x * d0 - lw * d0, ybot(d0)), (vx + lane_x * d0 + lw * d0, ybot(d0)),
                   (vx + lane_x * d1 + lw * d1, ybot(d1)), (vx + lane_x * d1 - lw * d1, ybot(d1))], lane)
    if rng.random() < 0.3:
        side, d0 = rng.choice([-1, 1]), rng.uniform(0.1, 0.6)
        d1 = d0 + rng.uniform(0.2, 0.6)
        c.polygon([(xat(road * 0.82, d0, side), ybot(d0)), (xat(road, d0, side), ybot(d0)),
                   (xat(road, d1, side), ybot(d1)), (xat(road * 0.82, d1, side), ybot(d1))],
                  c.material("parking", col("parking")))
    # Objects, sorted far to near.
    objects = []
    for _ in range(rng.integers(*prior["trees"])):
        objects.append(("tree", rng.uniform(0.08, 1.3), rng.choice([-1, 1])))
    for _ in range(rng.integers(*prior["poles"])):
        objects.append(("pole", rng.uniform(0.1, 1.1), rng.choice([-1, 1])))
    for _ in range(rng.integers(*prior["cars"])):
        objects.append(("car", rng.uniform(0.08, 1.15), rng.uniform(-0.85, 0.85)))
    for _ in range(rng.integers(*prior["persons"])):
        objects.append(("person", rng.uniform(0.1, 1.1), rng.choice([-1, 1]) if rng.random() < 0.85 else 0))
    if rng.random() < prior["bus"]:
        objects.append(("bus", rng.uniform(0.15, 0.8), rng.uniform(-0.5, 0.5)))
    if rng.random() < prior["rider"]:
        objects.append(("rider", rng.uniform(0.2, 1.0), rng.uniform(-0.8, 0.8)))
    for _ in range(rng.integers(0, 3)):
        objects.append(("static", rng.uniform(0.15, 1.1), rng.choice([-1, 1])))
    if rng.random() < 0.3:
        objects.append(("unlabeled", rng.uniform(0.3, 1.0), rng.uniform(-0.9, 0.9)))
    instance = 0
    for kind, d, where in sorted(objects, key=lambda o: o[1]):
        y = ybot(d)
        if kind == "tree":
            x = xat(road + walk * 0.85, d, where)
            m = c.material("vegetation", col("vegetation"))
            th, tw, r = 0.25 * k * H * d, max(1.0, 0.015 * k * W * d), 0.13 * k * H * d * rng.uniform(0.8, 1.4)
            c.rect(x - tw, y - th, x + tw, y, c.material("vegetation", (95, 70, 45)))
            c.ellipse(x, y - th - r * 0.8, r * rng.uniform(0.8, 1.2), r, m)
        elif kind == "pole":
            x = xat(road + walk * 0.12, d, where)
            ph, pw = 0.5 * k * H * d * rng.uniform(0.8, 1.2), max(0.6, 0.008 * k * W * d)
            c.rect(x - pw, y - ph, x + pw, y, c.material("pole", col("pole")))
            top, u = y - ph, rng.random()
            if u < 0.45:
                sz, m = 0.06 * k * H * d * rng.uniform(0.8, 1.3), c.material("sign", col("sign", 8))
                shape = rng.integers(3)
                if shape == 0:
                    c.rect(x - sz, top, x + sz, top + 1.4 * sz, m)
                elif shape == 1:
                    c.ellipse(x, top + sz, sz, sz, m)
                else:
                    c.polygon([(x - sz * 1.1, top), (x + sz * 1.1, top), (x, top + 1.8 * sz)], m)
            elif u < 0.8:
                lw_, lh = 0.025 * k * W * d, 0.09 * k * H * d
                c.rect(x - lw_, top, x + lw_, top + lh, c.material("light", col("light", 6)))
                lamp = [(220, 40, 30), (240, 200, 30), (40, 210, 80)][rng.integers(3)]
                c.ellipse(x, top + lh * rng.choice([0.2, 0.5, 0.8]), lw_ * 0.6, lw_ * 0.6, c.material("light", lamp))
        elif kind in ("car", "bus"):
            x = vx + where * road * d
            w = (0.42 if kind == "car" else 0.6) * k * road * d * rng.uniform(0.85, 1.15)
            h = w * (rng.uniform(0.7, 0.85) if kind == "car" else rng.uniform(1.0, 1.2))
            instance += 1
            body = c.material(kind, col(kind, 15), instance)
            dark = c.material(kind, (40, 45, 60), instance)
            if kind == "car":
                c.rect(x - w / 2, y - 0.6 * h, x + w / 2, y - 0.12 * h, body)
                c.polygon([(x - 0.42 * w, y - 0.6 * h), (x - 0.3 * w, y - h), (x + 0.3 * w, y - h),
                           (x + 0.42 * w, y - 0.6 * h)], body)
                c.polygon([(x - 0.35 * w, y - 0.62 * h), (x - 0.26 * w, y - 0.92 * h), (x + 0.26 * w, y - 0.92 * h),
                           (x + 0.35 * w, y - 0.62 * h)], dark)
                c.rect(x - 0.46 * w, y - 0.14 * h, x - 0.26 * w, y, dark)
                c.rect(x + 0.26 * w, y - 0.14 * h, x + 0.46 * w, y, dark)
                red = c.material(kind, (230, 30, 30), instance)
                c.rect(x - 0.48 * w, y - 0.5 * h, x - 0.36 * w, y - 0.42 * h, red)
                c.rect(x + 0.36 * w, y - 0.5 * h, x + 0.48 * w, y - 0.42 * h, red)
            else:
                c.rect(x - w / 2, y - h, x + w / 2, y - 0.05 * h, body)
                c.rect(x - 0.45 * w, y - 0.9 * h, x + 0.45 * w, y - 0.55 * h, dark)
                c.rect(x - 0.45 * w, y - 0.08 * h, x - 0.25 * w, y, dark)
                c.rect(x + 0.25 * w, y - 0.08 * h, x + 0.45 * w, y, dark)
        elif kind in ("person", "rider"):
            x = xat(road + walk * rng.uniform(0.25, 0.85), d, where) if kind == "person" and where else \
                vx + (where if kind == "rider" else rng.uniform(-0.8, 0.8)) * road * d
            ph = 0.42 * k * H * d * rng.uniform(0.85, 1.15)
            pw = 0.28 * ph
            instance += 1
            skin = c.material(kind, col("skin", 8), instance)
            shirt = c.material(kind, col("clothes", 15), instance)
            legs = c.material(kind, col("clothes", 15), instance)
            if kind == "rider":
                bike_inst = instance + 1
                bike = c.material("bicycle", col("bicycle", 8), bike_inst)
                wr, ww = 0.17 * ph, max(1, int(round(0.03 * ph)))
                c.ellipse(x - 0.28 * ph, y - wr, wr, wr, bike, width=ww)
                c.ellipse(x + 0.28 * ph, y - wr, wr, wr, bike, width=ww)
                c.polygon([(x - 0.28 * ph, y - wr), (x, y - 2.2 * wr), (x + 0.28 * ph, y - wr), (x, y - wr)], bike)
                instance += 1
                y = y - 0.3 * ph  # the rider sits above the bicycle
                c.rect(x - 0.12 * pw, y - 0.45 * ph, x + 0.12 * pw, y - 0.05 * ph, legs)
            else:
                step = rng.uniform(-0.15, 0.15) * pw
                c.polygon([(x - 0.35 * pw, y - 0.48 * ph), (x - 0.05 * pw, y - 0.48 * ph), (x - 0.2 * pw + step, y),
                           (x - 0.45 * pw + step, y)], legs)
                c.polygon([(x + 0.05 * pw, y - 0.48 * ph), (x + 0.35 * pw, y - 0.48 * ph), (x + 0.45 * pw - step, y),
                           (x + 0.2 * pw - step, y)], legs)
            c.polygon([(x - 0.45 * pw, y - 0.82 * ph), (x + 0.45 * pw, y - 0.82 * ph), (x + 0.38 * pw, y - 0.45 * ph),
                       (x - 0.38 * pw, y - 0.45 * ph)], shirt)
            c.ellipse(x, y - 0.9 * ph, 0.2 * pw * 1.4, 0.09 * ph, skin)
        elif kind == "static":  # bins, benches, hydrants: "static", ignored in training
            x = xat(road + walk * rng.uniform(0.1, 0.6), d, where)
            sw, sh = 0.04 * k * W * d * rng.uniform(0.7, 1.5), 0.1 * k * H * d * rng.uniform(0.6, 1.3)
            c.rect(x - sw, y - sh, x + sw, y, c.material("static", col("static")))
        else:  # clutter on the ground: "unlabeled"
            x = vx + where * (road + walk) * d
            c.ellipse(x, y, 0.05 * W * d, 0.025 * H * d, c.material("unlabeled", col("unlabeled")))
    if prior["hood"]:  # the ego vehicle's bonnet: a flat arc over the bottom rows, highest in the middle
        top = H * (1 - rng.uniform(*prior["hood"]))
        c.ellipse(W / 2, top + 0.6 * W, 0.75 * W, 0.6 * W, c.material("ego", col("ego", 4)))
    return c


def render_street(canvas, rng, style):
    """RGB uint8 [H, W, 3] of a scene in one style (GAME_STYLE or REAL_STYLE).

    Both styles: flat colours per material, windows on buildings, sky brightening towards the horizon, exposure
    jitter, sensor noise. REAL_STYLE also desaturates, darkens and tints every colour, turns the sky overcast,
    gives road, sidewalk, building, vegetation and terrain their own textures (asphalt grain and patches, paving
    joints, brick courses, leaf speckle, grass speckle), dark windows instead of reflective ones, a vignette and
    a Gaussian blur.
    """
    H, W = canvas.height, canvas.width
    mat = np.asarray(canvas.image)
    colours = np.array([m[1] for m in canvas.materials], np.float32)
    classes = np.array([m[0] for m in canvas.materials])
    if style["textures"]:  # overcast sky: the colour moves most of the way to a light grey
        colours[classes == "sky"] = 0.5 * colours[classes == "sky"] + 0.5 * np.array([208, 210, 214])
    gray = colours @ np.array([0.299, 0.587, 0.114], np.float32)
    colours = gray[:, None] + style["saturation"] * (colours - gray[:, None])
    colours = colours * style["brightness"] * np.array(style["cast"], np.float32)
    img = colours[mat]
    cls_map = classes[mat]
    yy, xx = np.mgrid[0:H, 0:W]
    scale = max(1, round(H / 64))
    # Windows: a grid over every building pixel.
    px, py = 4 * scale, 5 * scale
    windows = (cls_map == "building") & (xx % px < px // 2) & (yy % py < (py + 1) // 2)
    img[windows] = (95, 105, 120) if style["textures"] else (165, 205, 240)
    sky = cls_map == "sky"
    img[sky] *= (0.85 + 0.3 * yy[sky] / H)[:, None]
    if style["textures"]:
        def modulate(cls, factor):
            sel = cls_map == cls
            img[sel] *= factor[sel][:, None]

        modulate("road", 1 + 0.14 * rng.standard_normal((H, W)) + 0.12 * value_noise(rng, H, W, 6 * scale))
        modulate("sidewalk", np.where((yy % (3 * scale) == 0) | (xx % (6 * scale) == 0), 0.78, 1.0))
        modulate("building", np.where(yy % (2 * scale) == 0, 0.86, 1.0))
        modulate("vegetation", 1 + 0.45 * value_noise(rng, H, W, 2))
        modulate("terrain", 1 + 0.3 * value_noise(rng, H, W, 2))
        modulate("sky", 1 + 0.08 * value_noise(rng, H, W, max(2, W // 8)))
    else:
        veg = cls_map == "vegetation"
        img[veg] *= (1 + 0.1 * value_noise(rng, H, W, 3 * scale))[veg][:, None]
    img *= rng.uniform(*style["exposure"])
    if style["vignette"]:
        r2 = ((xx - W / 2) / (W / 2)) ** 2 + ((yy - H / 2) / (H / 2)) ** 2
        img *= (1 - style["vignette"] * r2 / 2)[..., None]
    if style["blur"]:
        blurred = Image.fromarray(to_uint8(img)).filter(ImageFilter.GaussianBlur(style["blur"] * scale))
        img = np.asarray(blurred, np.float32)
    img = img + rng.normal(0, style["noise"], img.shape)
    return to_uint8(img)


def street_labels(canvas, column):
    """Label map of a scene: column 0 = Cityscapes label ids, 1 = SYNTHIA class ids (uint8)."""
    table = np.array([STREET_CLASSES[m[0]][column] for m in canvas.materials], np.uint8)
    return table[np.asarray(canvas.image)]


def street_instances(canvas):
    table = np.array([m[2] if m[0] in DYNAMIC else 0 for m in canvas.materials], np.uint16)
    return table[np.asarray(canvas.image)]


# Cityscapes colour palette by label id (for GTA5's 'P'-mode label PNGs, which carry it).
CITYSCAPES_PALETTE = {
    7: (128, 64, 128), 8: (244, 35, 232), 9: (250, 170, 160), 11: (70, 70, 70), 12: (102, 102, 156),
    13: (190, 153, 153), 17: (153, 153, 153), 19: (250, 170, 30), 20: (220, 220, 0), 21: (107, 142, 35),
    22: (152, 251, 152), 23: (70, 130, 180), 24: (220, 20, 60), 25: (255, 0, 0), 26: (0, 0, 142),
    27: (0, 0, 70), 28: (0, 60, 100), 31: (0, 80, 100), 32: (0, 0, 230), 33: (119, 11, 32), 4: (111, 74, 0),
}


def _street_pair(seed, name, index, width, height, style):
    canvas = street_scene(item_rng(seed, name, "layout", index), width, height, name.split("/")[0])
    return canvas, render_street(canvas, item_rng(seed, name, "render", index), style)


def write_gta5(root, n, size, seed):
    """GTA5: images/00001.png (RGB) and labels/00001.png ('P' mode, Cityscapes palette, index = label id)."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    palette = np.zeros((256, 3), np.uint8)
    for k, v in CITYSCAPES_PALETTE.items():
        palette[k] = v
    for i in range(n):
        canvas, img = _street_pair(seed, "gta5", i, *size, GAME_STYLE)
        Image.fromarray(img).save(root / "images" / f"{i + 1:05d}.png")
        label = Image.fromarray(street_labels(canvas, 0), mode="L").convert("P")
        label.putpalette(palette.tobytes())
        label.save(root / "labels" / f"{i + 1:05d}.png")


def write_synthia(root, n, size, seed):
    """SYNTHIA-RAND-CITYSCAPES: RGB/0000000.png and GT/LABELS/0000000.png (16-bit RGB: class id, instance id, 0)."""
    root = Path(root)
    (root / "RGB").mkdir(parents=True, exist_ok=True)
    (root / "GT" / "LABELS").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        canvas, img = _street_pair(seed, "synthia", i, *size, GAME_STYLE)
        Image.fromarray(img).save(root / "RGB" / f"{i:07d}.png")
        label = np.zeros((size[1], size[0], 3), np.uint16)
        label[..., 0] = street_labels(canvas, 1)
        label[..., 1] = street_instances(canvas)
        write_png16(root / "GT" / "LABELS" / f"{i:07d}.png", label)


CITYSCAPES_CITIES = {"train": ("aachen", "bochum", "bremen", "cologne"), "val": ("frankfurt", "lindau", "munster")}


def write_cityscapes(root, n_train, n_val, size, seed):
    """Cityscapes: leftImg8bit/{split}/{city}/{city}_{seq:06d}_000019_leftImg8bit.png (RGB) and
    gtFine/{split}/{city}/..._gtFine_labelIds.png ('L', label ids)."""
    root = Path(root)
    for split, n in (("train", n_train), ("val", n_val)):
        cities = CITYSCAPES_CITIES[split]
        for i in range(n):
            city = cities[i % len(cities)]
            stem = f"{city}_{i // len(cities):06d}_000019"
            canvas, img = _street_pair(seed, f"cityscapes/{split}", i, *size, REAL_STYLE)
            for sub in ("leftImg8bit", "gtFine"):
                (root / sub / split / city).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            Image.fromarray(street_labels(canvas, 0), mode="L").save(
                root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")


# ---------------------------------------------------------------------------------------------------------------------
# Shapes: the objects of the COCO, YouTube-VIS and ImageNet sets
# ---------------------------------------------------------------------------------------------------------------------

# name -> (polygon kind, base colour, texture). Categories differ in shape, colour and texture together.
SHAPES = {
    "disc": ("disc", (220, 50, 40), "radial"),
    "square": ("square", (40, 90, 220), "stripes"),
    "triangle": ("triangle", (240, 200, 30), "flat"),
    "star": ("star", (40, 170, 70), "dots"),
    "cross": ("cross", (200, 60, 200), "two-tone"),
    "hexagon": ("hexagon", (40, 200, 210), "checker"),
}


def shape_polygon(kind, cx, cy, r, angle, aspect=1.0):
    """Vertices [[x, y], ...] of a shape of circumradius r centred at (cx, cy), rotated by `angle`."""
    if kind == "disc":
        t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif kind == "star":
        t = np.linspace(0, 2 * np.pi, 10, endpoint=False)
        rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        pts = np.stack([np.cos(t) * rad, np.sin(t) * rad], 1)
    elif kind == "cross":
        a = 0.33
        pts = np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a], [-1, a],
                        [-1, -a], [-a, -a]]) * 0.9
    else:
        k = {"square": 4, "triangle": 3, "hexagon": 6}[kind]
        t = np.linspace(0, 2 * np.pi, k, endpoint=False) + np.pi / k
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    pts = pts * np.array([r, r * aspect])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return pts @ rot.T + np.array([cx, cy])


def polygon_mask(points, width, height):
    """Binary mask (uint8 [H, W]) of a polygon, rasterised as pycocotools rasterises COCO polygons."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.frPyObjects([np.asarray(points, float).ravel().tolist()], height, width)
    return mask_utils.decode(rle)[..., 0]


def background(rng, height, width):
    """Float RGB [H, W, 3]: a gradient, a smooth colour field or stripes between two muted random colours."""
    a, b = rng.uniform(40, 200, 3), rng.uniform(40, 200, 3)
    kind = rng.integers(3)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == 0:
        t = (yy / height)[..., None]
    elif kind == 1:
        t = (0.5 + 0.5 * value_noise(rng, height, width, max(4, width // 4)))[..., None]
    else:
        ang, period = rng.uniform(0, np.pi), rng.uniform(6, 20)
        t = (0.5 + 0.5 * np.sin((xx * np.cos(ang) + yy * np.sin(ang)) * 2 * np.pi / period))[..., None] * 0.5
    img = a * (1 - t) + b * t
    return img + 10 * value_noise(rng, height, width, 3)[..., None]


def paint_shape(img, mask, name, rng, colour=None):
    """Paint one object in place: its category colour (jittered) modulated by its category texture."""
    _, base, texture = SHAPES[name]
    colour = np.clip(np.array(base, float) + rng.normal(0, 18, 3), 0, 255) if colour is None else colour
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return colour
    cy, cx = ys.mean(), xs.mean()
    span = max(np.ptp(ys), np.ptp(xs), 1) + 1
    if texture == "radial":
        f = 1.15 - 0.5 * np.hypot(ys - cy, xs - cx) / span
    elif texture == "stripes":
        f = np.where(((xs + ys) // max(2, span // 6)) % 2 == 0, 1.0, 0.6)
    elif texture == "dots":
        p = max(3, span // 5)
        f = np.where(((ys % p) - p / 2) ** 2 + ((xs % p) - p / 2) ** 2 < (p / 3) ** 2, 1.5, 0.9)
    elif texture == "two-tone":
        f = np.where(ys < cy, 1.2, 0.75)
    elif texture == "checker":
        p = max(2, span // 5)
        f = np.where(((ys // p) + (xs // p)) % 2 == 0, 1.15, 0.7)
    else:
        f = np.ones(len(ys))
    img[ys, xs] = np.clip(colour[None] * f[:, None], 0, 255)
    return colour


def place_shapes(rng, names, width, height, r_range, existing=(), max_overlap=0.15, tries=30):
    """Random non-degenerate shapes fully inside the image, each overlapping earlier ones by <= max_overlap of
    its area. Returns [(name, polygon [[x, y], ...], mask)] in painting order."""
    placed, occupied = [], np.zeros((height, width), bool)
    for m in existing:
        occupied |= m.astype(bool)
    for name in names:
        for _ in range(tries):
            r = rng.uniform(*r_range) * min(width, height)
            cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
            poly = shape_polygon(SHAPES[name][0], cx, cy, r, rng.uniform(0, 2 * np.pi), rng.uniform(0.8, 1.2))
            poly = np.round(np.clip(poly, 0.0, [width - 0.01, height - 0.01]), 2)
            mask = polygon_mask(poly, width, height)
            area = mask.sum()
            if area >= 16 and (mask.astype(bool) & occupied).sum() <= max_overlap * area:
                placed.append((name, poly, mask))
                occupied |= mask.astype(bool)
                break
    return placed


def box_of_mask(mask):
    """[x, y, w, h] of the tight pixel box of a binary mask (COCO convention: pixel edges)."""
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


# ---------------------------------------------------------------------------------------------------------------------
# COCO 2017 detection
# ---------------------------------------------------------------------------------------------------------------------

# Sparse ids as COCO's (1..90 with gaps): models keep COCO's 91 logits and label = category_id.
COCO_CATEGORIES = {2: "disc", 7: "square", 15: "triangle", 33: "star", 58: "cross", 90: "hexagon"}
# The background regions are COCO panoptic stuff classes (ids and names as COCO panoptic's, all > 90), each with
# its own look: (base colour, texture). Above a wavy horizon sky or a brick wall, below it one or two ground kinds.
COCO_STUFF = {187: "sky-other-merged", 171: "wall-brick", 193: "grass-merged", 154: "sand", 155: "sea", 149: "road"}
STUFF_LOOKS = {187: ((150, 185, 225), "sky"), 171: ((150, 85, 65), "bricks"), 193: ((85, 135, 60), "speckle"),
               154: ((200, 180, 135), "ripples"), 155: ((45, 95, 135), "waves"), 149: ((105, 105, 110), "grain")}
UPPER_STUFF, GROUND_STUFF = (187, 171), (193, 154, 155, 149)


def stuff_texture(rng, kind, colour, height, width):
    """Float RGB [H, W, 3] of one stuff class over the whole image (the caller keeps its region)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    colour = np.asarray(colour, np.float32)
    if kind == "sky":  # lighter towards the horizon, soft clouds
        clouds = value_noise(rng, height, width, max(4, width // 3))
        img = colour * (0.9 + 0.15 * yy / height)[..., None] + 14 * clouds[..., None]
    elif kind == "bricks":  # courses of bricks with light mortar joints, every other course shifted
        course = max(3, height // 14)
        brick = 2.2 * course
        row = yy // course
        joint = (yy % course == 0) | ((xx + (row % 2) * brick / 2) % brick < 1)
        img = colour * (1 + 0.08 * value_noise(rng, height, width, course))[..., None]
        img[joint] = (190, 180, 170)
    elif kind == "speckle":  # grass: per-pixel speckle over blotches
        blotches = value_noise(rng, height, width, 6)
        img = colour + rng.normal(0, 16, (height, width, 1)) * (0.8, 1.0, 0.6) + 10 * blotches[..., None]
    elif kind == "ripples":  # sand
        period, angle = rng.uniform(5, 9), rng.uniform(-0.4, 0.4)
        ripples = np.sin(2 * np.pi * (yy + angle * xx) / period)
        img = colour * (1 + 0.07 * ripples)[..., None] + rng.normal(0, 5, (height, width, 1))
    elif kind == "waves":  # horizontal crests, bent by smooth noise
        crests = np.sin(2 * np.pi * yy / rng.uniform(4, 7) + 2.5 * value_noise(rng, height, width, 8))
        img = colour + 22 * np.clip(crests, 0, 1)[..., None]
    else:  # grain: asphalt
        img = colour + rng.normal(0, 9, (height, width, 1)) + 8 * value_noise(rng, height, width, 5)[..., None]
    return img


def stuff_background(rng, height, width):
    """(float RGB [H, W, 3], stuff category id per pixel [H, W]): sky or a wall above a wavy horizon, one or two
    ground kinds below it, each with its own look (jittered per image)."""
    xs = np.arange(width, dtype=np.float32)

    def boundary(low, high):  # a wavy line: the row where the next region starts, per column
        amplitude, period = rng.uniform(0, 0.05) * height, rng.uniform(0.5, 2) * width
        return rng.uniform(low, high) * height + amplitude * np.sin(2 * np.pi * xs / period + rng.uniform(0, 6.3))

    rows = np.arange(height, dtype=np.float32)[:, None]
    ids = np.full((height, width), rng.choice(UPPER_STUFF), np.int64)
    ground = rng.choice(GROUND_STUFF, 2, replace=False)
    ids[rows >= boundary(0.2, 0.55)] = ground[0]
    if rng.random() < 0.5:
        ids[rows >= boundary(0.65, 0.85)] = ground[1]
    img = np.zeros((height, width, 3), np.float32)
    for category in np.unique(ids):
        colour, kind = STUFF_LOOKS[int(category)]
        texture = stuff_texture(rng, kind, np.clip(np.array(colour) + rng.normal(0, 12, 3), 0, 255), height, width)
        img[ids == category] = texture[ids == category]
    return img, ids


def coco_image(rng, width, height, image_id, ann_start):
    """One image with 2-6 shapes (and, sometimes, one iscrowd=1 group of small discs) over 2-3 stuff regions:
    (RGB uint8, instance annotations, panoptic segment ids [H, W], panoptic segments_info).

    Instance masks are the whole shapes; panoptic segments are the visible pixels (later shapes cover earlier
    ones; one segment per stuff class; the crowd one segment with iscrowd 1), segment id = category id * 1000 + k,
    and a 1-pixel void band (id 0) runs along each boundary between stuff regions, as COCO's unlabeled edges."""
    from pycocotools import mask as mask_utils

    img, stuff = stuff_background(rng, height, width)
    names = [COCO_CATEGORIES[k] for k in rng.choice(list(COCO_CATEGORIES), rng.integers(2, 7))]
    placed = place_shapes(rng, names, width, height, (0.1, 0.28))
    ids = {v: k for k, v in COCO_CATEGORIES.items()}
    segments = np.zeros((height, width), np.int64)
    for k, category in enumerate(np.unique(stuff)):
        segments[stuff == category] = category * 1000 + k + 1
    segments[1:][stuff[1:] != stuff[:-1]] = 0  # void band below each stuff boundary
    crowd = {}
    anns = []
    for name, poly, mask in placed:
        paint_shape(img, mask, name, rng)
        rle = mask_utils.encode(np.asfortranarray(mask))
        anns.append({"segmentation": [np.round(poly, 2).ravel().tolist()], "area": float(mask_utils.area(rle)),
                     "iscrowd": 0, "image_id": image_id, "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                     "category_id": ids[name]})
        segments[mask.astype(bool)] = ids[name] * 1000 + len(anns) + 10
    if rng.random() < 0.15:  # a crowd: many small discs annotated once, uncompressed RLE as COCO's crowds
        group = place_shapes(rng, ["disc"] * 8, width, height, (0.03, 0.05), existing=[p[2] for p in placed],
                             max_overlap=0.0, tries=10)
        if len(group) >= 3:
            union = np.zeros((height, width), np.uint8)
            colour = None
            for name, _, mask in group:
                colour = paint_shape(img, mask, name, rng, colour)
                union |= mask
            rle = mask_utils.encode(np.asfortranarray(union))
            anns.append({"segmentation": uncompressed_rle(union), "area": float(mask_utils.area(rle)), "iscrowd": 1,
                         "image_id": image_id, "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                         "category_id": ids["disc"]})
            crowd_id = ids["disc"] * 1000 + len(anns) + 10
            segments[union.astype(bool)] = crowd_id
            crowd[crowd_id] = True
    img += rng.normal(0, 3, img.shape)
    for k, ann in enumerate(anns):
        ann["id"] = ann_start + k
    segments_info = []
    for segment_id in np.unique(segments[segments > 0]).tolist():
        pixels = segments == segment_id
        segments_info.append({"id": segment_id, "category_id": segment_id // 1000, "iscrowd": int(segment_id in crowd),
                              "bbox": box_of_mask(pixels), "area": int(pixels.sum())})
    return to_uint8(img), anns, segments, segments_info


def uncompressed_rle(mask):
    """COCO's uncompressed RLE {'size': [h, w], 'counts': [...]}: run lengths of the column-major mask, 0s first."""
    flat = np.asarray(mask, np.uint8).ravel(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def write_coco(root, n_train, n_val, size, seed):
    """COCO: annotations/instances_{train,val}2017.json and {train,val}2017/<12-digit id>.jpg, and COCO panoptic:
    annotations/panoptic_{train,val}2017.json with panoptic_{train,val}2017/<12-digit id>.png (segment id = R + 256
    G + 256^2 B), the layout DETR's --coco_panoptic_path reads."""
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"supercategory": "shape", "id": k, "name": v} for k, v in COCO_CATEGORIES.items()]
    panoptic_categories = (
        [dict(c, isthing=1, color=list(SHAPES[c["name"]][1])) for c in categories]
        + [{"supercategory": "background", "id": k, "name": v, "isthing": 0, "color": list(STUFF_LOOKS[k][0])}
           for k, v in COCO_STUFF.items()])
    for split, n, first_id in (("train", n_train, 1), ("val", n_val, 900001)):
        folder, panoptic_folder = root / f"{split}2017", root / f"panoptic_{split}2017"
        folder.mkdir(exist_ok=True)
        panoptic_folder.mkdir(exist_ok=True)
        images, annotations, panoptic = [], [], []
        for i in range(n):
            rng = item_rng(seed, "coco", split, i)
            width, height = size if size else (int(rng.integers(112, 161)), int(rng.integers(96, 129)))
            image_id = first_id + i
            img, anns, segments, segments_info = coco_image(
                rng, width, height, image_id, len(annotations) + (1 if split == "train" else 5000001))
            name = f"{image_id:012d}.jpg"
            Image.fromarray(img).save(folder / name, quality=90)
            rgb = np.stack([segments % 256, segments // 256 % 256, segments // 65536], -1).astype(np.uint8)
            Image.fromarray(rgb).save(panoptic_folder / f"{image_id:012d}.png")
            images.append({"id": image_id, "file_name": name, "width": width, "height": height, "license": 1})
            annotations += anns
            panoptic.append({"image_id": image_id, "file_name": f"{image_id:012d}.png", "segments_info": segments_info})
        info = {"description": "synthetic shapes in the COCO 2017 layout (common/synthetic.py)", "version": "1.0",
                "year": 2017}
        licenses = [{"id": 1, "name": "CC0", "url": ""}]
        dataset = {"info": info, "licenses": licenses, "images": images, "annotations": annotations,
                   "categories": categories}
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(dataset))
        dataset = {"info": info, "licenses": licenses, "images": images, "annotations": panoptic,
                   "categories": panoptic_categories}
        (root / "annotations" / f"panoptic_{split}2017.json").write_text(json.dumps(dataset))


# ---------------------------------------------------------------------------------------------------------------------
# MOT17: pedestrians walking in front of a static camera
# ---------------------------------------------------------------------------------------------------------------------

MOT17_SEQUENCES = ("MOT17-02-FRCNN", "MOT17-04-FRCNN", "MOT17-05-FRCNN", "MOT17-09-FRCNN")


def draw_pedestrian(draw, x, y, h, look, phase, fill=None):
    """A pedestrian of height h standing on (x, y): head, torso, arms and two legs that swing with `phase`."""
    w = 0.38 * h
    skin, shirt, pants, hair = (fill,) * 4 if fill else look
    swing = 0.18 * w * np.sin(phase)
    for side, s in ((-1, swing), (1, -swing)):
        draw.polygon([(x + side * 0.05 * w, y - 0.5 * h), (x + side * 0.3 * w, y - 0.5 * h),
                      (x + side * 0.25 * w + s, y), (x + side * 0.02 * w + s, y)], fill=pants)
    draw.polygon([(x - 0.4 * w, y - 0.83 * h), (x + 0.4 * w, y - 0.83 * h), (x + 0.34 * w, y - 0.48 * h),
                  (x - 0.34 * w, y - 0.48 * h)], fill=shirt)
    for side in (-1, 1):
        draw.polygon([(x + side * 0.4 * w, y - 0.82 * h), (x + side * 0.5 * w, y - 0.8 * h),
                      (x + side * 0.48 * w - 0.6 * swing * side, y - 0.5 * h),
                      (x + side * 0.38 * w - 0.6 * swing * side, y - 0.5 * h)], fill=shirt)
    draw.ellipse([x - 0.2 * w, y - h, x + 0.2 * w, y - 0.83 * h], fill=skin)
    draw.chord([x - 0.21 * w, y - h - 0.01 * h, x + 0.21 * w, y - 0.86 * h], 180, 360, fill=hair)


def _tuple(rgb):
    return tuple(int(v) for v in np.clip(rgb, 0, 255))


def mot_sequence(rng, width, height, length, masks=False):
    """Tracks, rendered frames and distractors of one sequence.

    Returns (frames [uint8 [H, W, 3]], rows) with rows (frame, id, left, top, w, h, flag, class, visibility) in
    0-based pixel coordinates; with `masks` also, per frame, (labels uint8 [H, W], {label: pedestrian id, or 0 for
    the standing person, mannequin and reflection}): the visible pixels of each figure (MOTS20). Pedestrians
    (class 1) enter through the left/right borders or appear from the far end, walk with smooth velocities, cross
    each other, and leave; height grows with the foot's y (perspective).
    Visibility = fraction of the box not covered by nearer boxes nor cut by the image border. A standing person
    (class 7), a mannequin in a shop window (class 8) and a reflection (class 12) are drawn as well, flag 0.
    """
    W, H = width, height
    y_far, y_near = 0.42 * H, 1.08 * H  # foot y range; height(y) grows linearly between them

    def person_h(y):
        return H * (0.18 + 0.5 * (y - y_far) / (y_near - y_far))

    # Background: facade, shop window, pavement.
    bg = np.zeros((H, W, 3), np.float32)
    wall = rng.uniform(90, 190, 3)
    bg[:] = wall
    yy, xx = np.mgrid[0:H, 0:W]
    ground = yy >= 0.36 * H
    bg[ground] = rng.uniform(100, 160) + 12 * ((xx[ground] // 12 + yy[ground] // 6) % 2)[:, None]
    win_x0, win_x1 = sorted(rng.uniform(0.05, 0.95, 2) * W)
    if win_x1 - win_x0 < 0.25 * W:
        win_x0, win_x1 = 0.1 * W, 0.45 * W
    bg[int(0.05 * H):int(0.3 * H), int(win_x0):int(win_x1)] = (60, 80, 100)
    bg += 8 * value_noise(rng, H, W, 8)[..., None]

    def new_look():
        return (_tuple(np.array(GAME_COLOURS["skin"][rng.integers(3)]) + rng.normal(0, 8, 3)),
                _tuple(np.array(GAME_COLOURS["clothes"][rng.integers(7)]) + rng.normal(0, 20, 3)),
                _tuple(np.array(GAME_COLOURS["clothes"][rng.integers(7)]) * 0.6 + rng.normal(0, 15, 3)),
                _tuple(rng.uniform(20, 90, 3)))

    # Pedestrian tracks: foot position per frame (NaN when not in the scene).
    tracks = []
    n_tracks = int(rng.integers(8, 13)) * max(1, length // 100)
    for k in range(n_tracks):
        start = 0 if k < 5 else int(rng.integers(0, max(1, length - 10)))
        speed = rng.uniform(0.4, 1.3) * W / 160
        direction = rng.choice([-1, 1])
        y0 = rng.uniform(y_far + 0.04 * H, H * 0.98)
        if start == 0:
            x0 = rng.uniform(0.05, 0.95) * W
        elif rng.random() < 0.8:
            x0 = -0.2 * person_h(y0) if direction > 0 else W + 0.2 * person_h(y0)
        else:
            x0, y0 = rng.uniform(0.2, 0.8) * W, y_far + 0.02 * H
        vel = np.array([direction * speed, rng.uniform(-0.15, 0.25) * speed])
        pos = np.full((length, 2), np.nan)
        p = np.array([x0, y0])
        for t in range(start, length):
            pos[t] = p
            vel = vel + rng.normal(0, 0.03, 2) * speed
            vel[1] = np.clip(vel[1], -0.3 * speed, 0.4 * speed)
            p = p + vel
            h = person_h(p[1])
            if p[0] < -0.3 * h or p[0] > W + 0.3 * h or p[1] > y_near or p[1] < y_far:
                break
        tracks.append((pos, new_look(), rng.uniform(0, 2 * np.pi)))
    standing = (rng.uniform(0.1, 0.9) * W, rng.uniform(y_far + 0.1 * H, 0.9 * H), new_look())
    mannequin = ((win_x0 + win_x1) / 2, 0.3 * H, 0.22 * H)
    reflection_look = new_look()
    frames, rows, label_maps = [], [], []
    for t in range(length):
        img = Image.fromarray(to_uint8(bg))
        draw = ImageDraw.Draw(img)
        labels = Image.new("L", (W, H), 0)  # figure label per pixel; later (nearer) figures overwrite
        ids = {1: 0}
        # Mannequin (8) inside the shop window and a faint reflection (12) on its glass: drawn on the background.
        mx, my, mh = mannequin
        draw_pedestrian(draw, mx, my, mh, None, 0.0, fill=(150, 150, 150))
        draw_pedestrian(ImageDraw.Draw(labels), mx, my, mh, None, 0.0, fill=1)
        refl = Image.new("RGB", (W, H), (0, 0, 0))
        rx = win_x0 + (win_x1 - win_x0) * (0.5 + 0.4 * np.sin(t / 25))
        draw_pedestrian(ImageDraw.Draw(refl), rx, 0.29 * H, 0.2 * H, reflection_look, t / 3)
        refl_mask = np.asarray(refl).sum(-1) > 0
        refl_mask[:, : int(win_x0)] = False
        refl_mask[:, int(win_x1):] = False
        arr = np.asarray(img).astype(np.float32)
        arr[refl_mask] = 0.7 * arr[refl_mask] + 0.3 * np.asarray(refl, np.float32)[refl_mask]
        img = Image.fromarray(to_uint8(arr))
        draw = ImageDraw.Draw(img)
        labels = np.asarray(labels).copy()
        labels[refl_mask] = 1
        labels = Image.fromarray(labels)
        people = [(standing[1], -1, standing[0], standing[2], 0.0)]
        for k, (pos, look, phase) in enumerate(tracks):
            if not np.isnan(pos[t, 0]):
                people.append((pos[t, 1], k, pos[t, 0], look, phase + 0.35 * t))
        people.sort(key=lambda p: p[0])  # far (small y) first: nearer people occlude them
        boxes = []
        for y, k, x, look, ph in people:
            h = person_h(y)
            draw_pedestrian(draw, x, y, h, look, ph if k >= 0 else 0.0)
            draw_pedestrian(ImageDraw.Draw(labels), x, y, h, None, ph if k >= 0 else 0.0, fill=len(ids) + 1)
            ids[len(ids) + 1] = k + 1 if k >= 0 else 0
            boxes.append((k, x - 0.2 * h, y - h, 0.4 * h, h))
        covered = np.zeros((H, W), bool)
        for k, left, top, bw, bh in reversed(boxes):  # near to far: visibility from nearer boxes and the border
            x0i, y0i, x1i, y1i = int(round(left)), int(round(top)), int(round(left + bw)), int(round(top + bh))
            full = max(1, (x1i - x0i) * (y1i - y0i))
            cx0, cy0, cx1, cy1 = max(x0i, 0), max(y0i, 0), min(x1i, W), min(y1i, H)
            seen = 0
            if cx1 > cx0 and cy1 > cy0:
                seen = int((~covered[cy0:cy1, cx0:cx1]).sum())
                covered[cy0:cy1, cx0:cx1] = True
            vis = seen / full
            track_id, flag, cls = (k + 1, 1, 1) if k >= 0 else (n_tracks + 1, 0, 7)
            rows.append((t + 1, track_id, left, top, bw, bh, flag, cls, vis))
        rows.append((t + 1, n_tracks + 2, mx - 0.2 * mh, my - mh, 0.4 * mh, mh, 0, 8, 1.0))
        if refl_mask.any():
            ys, xs = np.nonzero(refl_mask)
            rows.append((t + 1, n_tracks + 3, float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1),
                         float(np.ptp(ys) + 1), 0, 12, 1.0))
        arr = np.asarray(img, np.float32) + rng.normal(0, 3, (H, W, 3))
        frames.append(to_uint8(arr))
        label_maps.append((np.asarray(labels), ids))
    return (frames, rows, label_maps) if masks else (frames, rows)


def write_mot17(root, n_sequences, length, size, seed):
    """MOT17: train/MOT17-XX-FRCNN/{seqinfo.ini, img1/000001.jpg..., gt/gt.txt, det/det.txt}."""
    width, height = size
    for s in range(n_sequences):
        name = MOT17_SEQUENCES[s % len(MOT17_SEQUENCES)] if s < len(MOT17_SEQUENCES) else f"MOT17-{20 + s:02d}-FRCNN"
        rng = item_rng(seed, "mot17", name)
        frames, rows = mot_sequence(rng, width, height, length)
        seq = Path(root) / "train" / name
        for sub in ("img1", "gt", "det"):
            (seq / sub).mkdir(parents=True, exist_ok=True)
        for t, frame in enumerate(frames):
            Image.fromarray(frame).save(seq / "img1" / f"{t + 1:06d}.jpg", quality=90)
        # gt.txt: 1-based pixel coordinates, sorted by track id then frame, as the released files.
        gt = sorted(rows, key=lambda r: (r[1], r[0]))
        (seq / "gt" / "gt.txt").write_text("".join(
            f"{f},{i},{left + 1:.0f},{top + 1:.0f},{w:.0f},{h:.0f},{flag},{cls},{vis:.5f}\n"
            for f, i, left, top, w, h, flag, cls, vis in gt))
        # det.txt: a noisy detector: misses, jittered boxes, scores, occasional false positives.
        det_rng = item_rng(seed, "mot17-det", name)
        dets = []
        for f, _, left, top, w, h, _, cls, vis in rows:
            if cls in (1, 7) and vis > 0.2 and det_rng.random() < 0.55 + 0.4 * vis:
                j = det_rng.normal(0, 0.04, 4) * (w, h, w, h)
                dets.append((f, left + j[0], top + j[1], w + j[2], h + j[3], det_rng.uniform(0.4, 1.0) * vis ** 0.3))
        for f in range(1, length + 1):
            if det_rng.random() < 0.1:
                h = det_rng.uniform(0.15, 0.5) * height
                dets.append((f, det_rng.uniform(0, width - 0.4 * h), det_rng.uniform(0, height - h), 0.4 * h, h,
                             det_rng.uniform(0.05, 0.5)))
        dets.sort(key=lambda d: d[0])
        (seq / "det" / "det.txt").write_text("".join(
            f"{f},-1,{left + 1:.1f},{top + 1:.1f},{w:.1f},{h:.1f},{conf:.4f},-1,-1,-1\n"
            for f, left, top, w, h, conf in dets))
        (seq / "seqinfo.ini").write_text(
            f"[Sequence]\nname={name}\nimDir=img1\nframeRate=30\nseqLength={length}\nimWidth={width}\n"
            f"imHeight={height}\nimExt=.jpg\n")


def write_mots20(root, n_sequences, length, size, seed):
    """MOTS20: train/MOTS20-XX/{seqinfo.ini, img1/000001.jpg..., gt/gt.txt}, the frames of the MOT17 sequence of the
    same number with the visible pixels of each pedestrian as KITTI-MOTS rows `frame id class height width rle`
    (id 2000 + pedestrian id, class 2; one class-10 ignore region, id 10000, per frame for the standing person,
    mannequin and reflection; pycocotools RLE strings), sorted by frame then id."""
    from pycocotools import mask as rle_tools
    width, height = size
    for s in range(n_sequences):
        name = MOT17_SEQUENCES[s % len(MOT17_SEQUENCES)] if s < len(MOT17_SEQUENCES) else f"MOT17-{20 + s:02d}-FRCNN"
        frames, _, label_maps = mot_sequence(item_rng(seed, "mot17", name), width, height, length, masks=True)
        seq = Path(root) / "train" / name.replace("MOT17", "MOTS20").rsplit("-", 1)[0]
        for sub in ("img1", "gt"):
            (seq / sub).mkdir(parents=True, exist_ok=True)
        lines = []
        for t, (frame, (labels, ids)) in enumerate(zip(frames, label_maps)):
            Image.fromarray(frame).save(seq / "img1" / f"{t + 1:06d}.jpg", quality=90)
            objects = {}
            for label, pedestrian in ids.items():
                key = 2000 + pedestrian if pedestrian else 10000
                objects[key] = objects.get(key, 0) | (labels == label)
            for key, mask in sorted(objects.items()):
                if mask.any():
                    rle = rle_tools.encode(np.asfortranarray(mask.astype(np.uint8)))
                    lines.append(f"{t + 1} {key} {key // 1000} {height} {width} {rle['counts'].decode()}\n")
        (seq / "gt" / "gt.txt").write_text("".join(lines))
        (seq / "seqinfo.ini").write_text(
            f"[Sequence]\nname={seq.name}\nimDir=img1\nframeRate=30\nseqLength={length}\nimWidth={width}\n"
            f"imHeight={height}\nimExt=.jpg\n")


# ---------------------------------------------------------------------------------------------------------------------
# YouTube-VIS 2019: short clips of moving shapes
# ---------------------------------------------------------------------------------------------------------------------

# Ids inside YouTube-VIS 2019's 1..40 (models keep its 41 logits).
YTVIS_CATEGORIES = {3: "disc", 9: "square", 17: "triangle", 26: "star", 40: "cross"}


def ytvis_video(rng, width, height, length):
    """Frames and per-instance visible masks (None where absent) of one clip.

    1-3 shapes move with constant velocity, a slow spin and a slow scale change over a drifting background; some
    start or end outside the frame, so they enter or leave. Later instances occlude earlier ones and masks hold the
    visible pixels only, so an instance hidden in a frame gets None there, as in YouTube-VIS.
    """
    pad = width // 4
    bg = background(rng, height + 2 * pad, width + 2 * pad)
    drift = rng.uniform(-1.5, 1.5, 2)
    ids = list(YTVIS_CATEGORIES)
    instances = []
    for _ in range(rng.integers(1, 4)):
        r = rng.uniform(0.12, 0.25) * min(width, height)
        start = np.array([rng.uniform(0, width), rng.uniform(0, height)])
        if rng.random() < 0.3:  # enters from a side
            start[0] = -r if rng.random() < 0.5 else width + r
        vel = rng.uniform(-0.06, 0.06, 2) * width
        if start[0] < 0:
            vel[0] = abs(vel[0]) + 0.05 * width
        elif start[0] > width:
            vel[0] = -abs(vel[0]) - 0.05 * width
        cat = int(ids[rng.integers(len(ids))])
        colour = np.clip(np.array(SHAPES[YTVIS_CATEGORIES[cat]][1], float) + rng.normal(0, 18, 3), 0, 255)
        instances.append(dict(cat=cat, r=r, start=start, vel=vel, angle=rng.uniform(0, 2 * np.pi),
                              spin=rng.uniform(-0.15, 0.15), grow=rng.uniform(-0.03, 0.03), colour=colour))
    frames, masks = [], [[] for _ in instances]
    for t in range(length):
        ox, oy = (pad + drift * t).round().astype(int).clip(0, 2 * pad)
        img = bg[oy:oy + height, ox:ox + width].copy()
        drawn = []
        for inst in instances:
            r = inst["r"] * (1 + inst["grow"] * t)
            c = inst["start"] + inst["vel"] * t
            kind = SHAPES[YTVIS_CATEGORIES[inst["cat"]]][0]
            poly = shape_polygon(kind, c[0], c[1], r, inst["angle"] + inst["spin"] * t)
            canvas = Image.new("L", (width, height), 0)
            ImageDraw.Draw(canvas).polygon([tuple(p) for p in poly], fill=1)
            drawn.append(np.asarray(canvas, np.uint8).copy())
        for k, inst in enumerate(instances):
            visible = drawn[k].copy()
            for later in drawn[k + 1:]:
                visible[later.astype(bool)] = 0
            paint_shape(img, drawn[k], YTVIS_CATEGORIES[inst["cat"]], rng, inst["colour"])
            masks[k].append(visible if visible.sum() >= 4 else None)
        frames.append(to_uint8(img + rng.normal(0, 3, img.shape)))
    return frames, [inst["cat"] for inst in instances], masks


def write_youtube_vis(root, n_train, n_holdout, length, size, seed):
    """YouTube-VIS 2019: train/JPEGImages/<video>/<frame>.jpg, train.json, and a held-out split with annotations,
    valid_holdout.json, whose frames lie in the same train/JPEGImages folder (as a split of the train set)."""
    from pycocotools import mask as mask_utils

    root = Path(root)
    width, height = size
    categories = [{"supercategory": "shape", "id": k, "name": v} for k, v in YTVIS_CATEGORIES.items()]
    ann_id = 1
    for split, n, first in (("train", n_train, 0), ("valid_holdout", n_holdout, n_train)):
        videos, annotations = [], []
        for v in range(first, first + n):
            rng = item_rng(seed, "youtube_vis", v)
            name = f"{rng.integers(16 ** 10):010x}"
            t_len = int(length if length else rng.integers(8, 13))
            frames, cats, masks = ytvis_video(rng, width, height, t_len)
            folder = root / "train" / "JPEGImages" / name
            folder.mkdir(parents=True, exist_ok=True)
            file_names = []
            for t, frame in enumerate(frames):
                Image.fromarray(frame).save(folder / f"{5 * t:05d}.jpg", quality=90)
                file_names.append(f"{name}/{5 * t:05d}.jpg")
            videos.append({"id": v + 1, "width": width, "height": height, "length": t_len, "file_names": file_names,
                           "license": 1, "flickr_url": "", "coco_url": "", "date_captured": ""})
            for cat, inst_masks in zip(cats, masks):
                if all(m is None for m in inst_masks):
                    continue
                segs, boxes, areas = [], [], []
                for m in inst_masks:
                    if m is None:
                        segs.append(None), boxes.append(None), areas.append(None)
                        continue
                    rle = mask_utils.encode(np.asfortranarray(m))
                    segs.append(uncompressed_rle(m))
                    boxes.append([float(b) for b in mask_utils.toBbox(rle)])
                    areas.append(int(mask_utils.area(rle)))
                annotations.append({"id": ann_id, "video_id": v + 1, "category_id": cat, "iscrowd": 0,
                                    "segmentations": segs, "bboxes": boxes, "areas": areas,
                                    "width": width, "height": height, "length": 1})
                ann_id += 1
        dataset = {"info": {"description": "synthetic shapes in the YouTube-VIS 2019 layout (common/synthetic.py)",
                            "version": "1.0", "year": 2019},
                   "licenses": [{"id": 1, "name": "CC0", "url": ""}],
                   "videos": videos, "annotations": annotations, "categories": categories}
        (root / f"{split}.json").write_text(json.dumps(dataset))


# ---------------------------------------------------------------------------------------------------------------------
# ImageNet-style classification folders
# ---------------------------------------------------------------------------------------------------------------------

# WordNet-style folder names (made up; not real synsets) -> shape class.
IMAGENET_CLASSES = {"n09000001": "disc", "n09000002": "square", "n09000003": "triangle", "n09000004": "star",
                    "n09000005": "cross", "n09000006": "hexagon"}


def imagenet_image(rng, name, width, height):
    """One large object of class `name` over a background, with 0-2 small shapes of other classes as clutter."""
    img = background(rng, height, width)
    others = [n for n in SHAPES if n != name]
    clutter = place_shapes(rng, [others[i] for i in rng.choice(len(others), rng.integers(0, 3))], width, height,
                           (0.08, 0.14))
    for n, _, m in clutter:
        paint_shape(img, m, n, rng)
    main = place_shapes(rng, [name], width, height, (0.25, 0.45), max_overlap=1.0)
    for n, _, m in main:
        paint_shape(img, m, n, rng)
    return to_uint8(img + rng.normal(0, 4, img.shape))


def write_imagenet(root, n_train, n_val, size, seed):
    """ImageNet: train/<wnid>/<wnid>_<k>.JPEG and val/<wnid>/ILSVRC2012_val_<8 digits>.JPEG (class folders)."""
    root = Path(root)
    val_index = 1
    for c, (wnid, name) in enumerate(IMAGENET_CLASSES.items()):
        for split, n in (("train", n_train), ("val", n_val)):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = imagenet_image(item_rng(seed, "imagenet", split, c * 100000 + i), name, *size)
                if split == "train":
                    fname = f"{wnid}_{i + 1}.JPEG"
                else:
                    fname = f"ILSVRC2012_val_{val_index:08d}.JPEG"
                    val_index += 1
                Image.fromarray(img).save(folder / fname, format="JPEG", quality=90)


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------

# Default counts and sizes (W, H); --images N scales every count by N / 200, --size replaces every size.
DEFAULTS = {
    "gta5": dict(n=200, size=(160, 88)),
    "synthia": dict(n=200, size=(128, 76)),
    "cityscapes": dict(n_train=200, n_val=50, size=(128, 64)),
    "coco": dict(n_train=200, n_val=50, size=None),  # None: each image 112-160 x 96-128, as COCO's sizes vary
    "mot17": dict(n_sequences=2, length=100, size=(160, 128)),
    "mots20": dict(n_sequences=2, length=100, size=(160, 128)),  # the mot17 sequences' frames, with masks
    "youtube_vis": dict(n_train=60, n_holdout=30, length=None, size=(128, 96)),  # None: 8-12 frames per video
    "imagenet": dict(n_train=60, n_val=20, size=(64, 64)),
}
MINIMUM = {"n": 1, "n_train": 1, "n_val": 1, "n_holdout": 1, "n_sequences": 1, "length": 4}
MARKER = ".synthetic"  # written last in each OUT/<name>/: marks a complete set this module may replace
WRITERS = {"gta5": write_gta5, "synthia": write_synthia, "cityscapes": write_cityscapes, "coco": write_coco,
           "mot17": write_mot17, "mots20": write_mots20, "youtube_vis": write_youtube_vis, "imagenet": write_imagenet}


def write(out, only=FORMATS, seed=0, images=None, size=None, verbose=False):
    """Write the selected datasets under out/<name>/; returns {name: seconds}.

    An existing out/<name>/ is replaced if this module wrote it (it holds the .synthetic marker with the settings)
    and is an error otherwise, so a real dataset is never overwritten."""
    times = {}
    for name in only:
        assert name in WRITERS, f"unknown dataset {name!r}; choose from {', '.join(FORMATS)}"
        kwargs = dict(DEFAULTS[name])
        if images is not None:
            for key in kwargs:
                keep = name in ("mot17", "mots20") and key == "n_sequences"
                if key in MINIMUM and kwargs[key] is not None and not keep:
                    kwargs[key] = max(MINIMUM[key], round(kwargs[key] * images / 200))
        if size is not None:
            kwargs["size"] = tuple(size)
        start = time.time()
        target = Path(out) / name
        if target.exists():  # rewrite only what this module wrote (never a real dataset): no stale files remain
            if any(target.iterdir()) and not (target / MARKER).is_file():
                raise FileExistsError(f"{target} exists and was not written by common.synthetic (no {MARKER} "
                                      "file); refusing to write into it")
            shutil.rmtree(target)
        target.mkdir(parents=True)
        WRITERS[name](target, seed=seed, **kwargs)
        (target / MARKER).write_text(json.dumps({"seed": seed, **{k: v for k, v in kwargs.items()}}) + "\n")
        times[name] = time.time() - start
        if verbose:
            shown = ", ".join(f"{k}={v}" for k, v in kwargs.items())
            print(f"{name:12s} {shown}  ({times[name]:.1f} s)", flush=True)
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="output root; writes OUT/<dataset>/ for each dataset")
    parser.add_argument("--only", default=",".join(FORMATS), help=f"comma-separated subset of {','.join(FORMATS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=None,
                        help="training images of the segmentation sets (default 200); every count scales by N/200")
    parser.add_argument("--size", type=parse_size, default=None, help="WxH for every selected dataset")
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    start = time.time()
    write(args.out, only, args.seed, args.images, args.size, verbose=True)
    print(f"wrote {', '.join(only)} to {args.out} in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
