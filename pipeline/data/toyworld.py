"""ToyWorld: a procedural world of labelled scenes in which CLIP- and SAM-like models can learn.

No pretrained foundation model can be obtained on the project's machines, so the demo needs its own small,
honest world. ``render_scene(seed)`` draws an outdoor scene for the 12-word ``toy`` vocabulary (ids below)
with a per-pixel label map and the visible mask of every thing instance. Semantics are learnable from
appearance (per-class colour distribution, texture, shape family) and from context (sky on top, ground stuff
below an irregular horizon, buildings and trees rising from it, things standing on plausible stuff).

Choices of our own (no paper describes this world):
    * All geometry is drawn in normalised units (fractions of the image side) from a ``layout`` stream and all
      per-pixel texture from a separate ``texture`` stream, both spawned from ``np.random.default_rng(seed)``:
      the same seed at another ``size`` gives the same scene, re-rendered.
    * Things are painted far-to-near (by foot position); an instance whose visible area falls under
      ``MIN_THING_FRACTION`` of the image is not painted at all, so the label map and the instance masks agree.
    * Stuff ids 0-6 fill regions; thing ids 7-11 are instances. Every pixel is labelled (no ignore value).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.data.records import ImageRecord, InputIdentity, ItemRef, failed_record, refs_identity, resolve_vocab
from pipeline.data.vocab import Vocabulary

CLASS_NAMES: tuple[str, ...] = (
    "sky", "grass", "road", "water", "building", "tree", "sand", "car", "person", "dog", "boat", "ball",
)
SKY, GRASS, ROAD, WATER, BUILDING, TREE, SAND, CAR, PERSON, DOG, BOAT, BALL = range(12)
STUFF_IDS: tuple[int, ...] = (SKY, GRASS, ROAD, WATER, BUILDING, TREE, SAND)
THING_IDS: tuple[int, ...] = (CAR, PERSON, DOG, BOAT, BALL)
MIN_THING_FRACTION = 0.002
SPLIT_OFFSETS: dict[str, int] = {"train": 0, "val": 1 << 40, "test": 2 << 40}
WORLD_SPAN = 1 << 24  # scene indices available per (split, world seed)

# Where each thing may stand (its foot pixel's stuff class).
THING_SUPPORT: dict[int, tuple[int, ...]] = {
    CAR: (ROAD,), BOAT: (WATER,), PERSON: (GRASS, SAND, ROAD), DOG: (GRASS, SAND, ROAD), BALL: (GRASS, SAND, ROAD),
}
# Base colours (RGB 0-255) per thing class; one is picked per instance, then jittered.
THING_PALETTES: dict[int, np.ndarray] = {
    CAR: np.array([[200, 30, 30], [30, 60, 190], [235, 235, 235], [25, 25, 30], [230, 200, 40]], float),
    PERSON: np.array([[200, 60, 60], [50, 90, 170], [240, 170, 40], [90, 40, 120], [40, 130, 120]], float),
    DOG: np.array([[140, 90, 45], [200, 160, 100], [60, 45, 35], [170, 120, 70]], float),
    BOAT: np.array([[245, 245, 245], [190, 35, 40], [30, 40, 110]], float),
    BALL: np.array([[255, 130, 0], [255, 230, 0], [230, 20, 120], [0, 200, 230]], float),
}


@dataclass
class ToyScene:
    """One rendered scene.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        label: (H, W) uint8 train ids into ``CLASS_NAMES``; every pixel labelled.
        instances: Thing instances as ``(class_id, mask)``, mask (H, W) bool of the visible pixels, far to near.
    """

    image: np.ndarray
    label: np.ndarray
    instances: list[tuple[int, np.ndarray]] = field(default_factory=list)

    def segments(self) -> list[tuple[int, np.ndarray]]:
        """Thing instances plus every 4-connected stuff region, as ``(class_id, (H, W) bool mask)``."""
        from scipy import ndimage

        stuff_regions = []
        for class_id in STUFF_IDS:
            components, count = ndimage.label(self.label == class_id)
            stuff_regions += [(class_id, components == k) for k in range(1, count + 1)]
        return self.instances + stuff_regions


def split_seed(split: str, index: int, world_seed: int = 0) -> int:
    """Scene seed of image ``index`` of ``split`` in world ``world_seed``; ranges of different splits never meet.

    Args:
        split: "train", "val" or "test".
        index: Image index, 0 <= index < 2**24.
        world_seed: Seed of the whole world, 0 <= world_seed < 2**16.

    Returns:
        ``SPLIT_OFFSETS[split] + world_seed * 2**24 + index``.
    """
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"unknown toyworld split {split!r}; expected one of {sorted(SPLIT_OFFSETS)}")
    if not 0 <= index < WORLD_SPAN or not 0 <= world_seed < 1 << 16:
        raise ValueError(f"toyworld index {index} or world seed {world_seed} out of range")
    return SPLIT_OFFSETS[split] + world_seed * WORLD_SPAN + index


def _smooth_field(layout: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """(size, size) float field: a (cells, cells) standard-normal grid, bilinearly upsampled."""
    coarse = layout.normal(size=(cells, cells))
    pos = np.linspace(0, cells - 1, size)
    lo = np.minimum(np.floor(pos).astype(int), cells - 2)
    frac = pos - lo
    rows = coarse[lo] * (1 - frac)[:, None] + coarse[lo + 1] * frac[:, None]
    return rows[:, lo] * (1 - frac) + rows[:, lo + 1] * frac


class _Canvas:
    """Float RGB image plus label map painted in place; coordinates are normalised (x right, y down, in [0, 1))."""

    def __init__(self, size: int, texture: np.random.Generator) -> None:
        self.size = size
        self.texture = texture
        self.rgb = np.zeros((size, size, 3))
        self.label = np.zeros((size, size), np.uint8)
        centres = (np.arange(size) + 0.5) / size
        self.y, self.x = np.meshgrid(centres, centres, indexing="ij")

    def paint(self, mask: np.ndarray, class_id: int, colour: np.ndarray, noise: float = 0.0) -> None:
        """Paint ``colour`` (RGB, 3 floats or (H, W, 3)) plus per-pixel Gaussian noise of std ``noise`` into mask."""
        colour = np.broadcast_to(colour, self.rgb.shape)[mask]
        self.rgb[mask] = colour + self.texture.normal(0.0, noise, size=colour.shape) if noise else colour
        self.label[mask] = class_id


def _draw_sky_and_ground(canvas: _Canvas, layout: np.random.Generator) -> np.ndarray:
    """Sky above a wavy horizon, irregular regions of 1-2 of grass/water/sand below, maybe a road band.

    Returns:
        (W,) float horizon height per column, normalised.
    """
    size, x, y = canvas.size, canvas.x, canvas.y
    base, amp = layout.uniform(0.28, 0.5), layout.uniform(0, 0.05)
    freq, phase = layout.uniform(0.5, 2), layout.uniform(0, 6.3)
    horizon = base + amp * np.sin(2 * np.pi * freq * x[0] + phase)
    sky = y < horizon[None, :]
    top, bottom = np.array([60, 120, 205.0]) * layout.uniform(0.9, 1.1), np.array([175, 205, 235.0])
    depth = np.clip(y / horizon[None, :], 0, 1)[..., None]
    clouds = (_smooth_field(layout, size, 7) > layout.uniform(0.8, 2.5))[..., None] * np.array([60, 40, 15.0])
    canvas.paint(sky, SKY, np.minimum(top * (1 - depth) + bottom * depth + clouds, 255), noise=3)

    ground_classes = layout.choice([GRASS, WATER, SAND], size=layout.integers(1, 3), replace=False)
    fields = np.stack([_smooth_field(layout, size, 5) for _ in ground_classes])
    regions = ground_classes[np.argmax(fields, axis=0)]
    for class_id in ground_classes:
        _paint_ground(canvas, layout, ~sky & (regions == class_id), int(class_id))
    if layout.uniform() < 0.6:
        centre = layout.uniform(base + 0.1, 0.9) + layout.uniform(-0.25, 0.25) * (x - 0.5)
        half_width = layout.uniform(0.05, 0.12) * (0.4 + (y - base) / (1 - base))
        band = ~sky & (np.abs(y - centre) < half_width)
        lane = (np.abs(y - centre) < 0.08 * half_width) & (np.sin(x * layout.uniform(40, 70)) > 0)
        colour = np.where(lane[..., None], [230, 220, 120.0], np.array([85, 85, 92.0]) * layout.uniform(0.85, 1.15))
        canvas.paint(band, ROAD, colour, noise=6)
    return horizon


def _paint_ground(canvas: _Canvas, layout: np.random.Generator, mask: np.ndarray, class_id: int) -> None:
    """Grass: green with strong speckle; water: blue with horizontal waves; sand: beige with fine grain."""
    x, y = canvas.x, canvas.y
    if class_id == GRASS:
        blobs = 18 * _smooth_field(layout, canvas.size, 12)[..., None] * np.array([0.4, 1, 0.3])
        canvas.paint(mask, GRASS, np.array([65, 140, 50.0]) * layout.uniform(0.85, 1.15) + blobs, noise=14)
    elif class_id == WATER:
        waves = np.sin(2 * np.pi * (y * layout.uniform(25, 40) + 0.15 * np.sin(9 * x)))[..., None]
        canvas.paint(mask, WATER, np.array([35, 90, 165.0]) * layout.uniform(0.85, 1.15) + 22 * waves, noise=4)
    else:
        canvas.paint(mask, SAND, np.array([215, 192, 140.0]) * layout.uniform(0.9, 1.08), noise=9)


def _draw_background_stuff(canvas: _Canvas, layout: np.random.Generator, horizon: np.ndarray) -> None:
    """0-3 buildings (window grids) and 0-3 trees (round canopy on a trunk) standing on the horizon."""
    x, y, size = canvas.x, canvas.y, canvas.size
    for _ in range(layout.integers(0, 4)):
        cx, half_w, height = layout.uniform(0.05, 0.95), layout.uniform(0.05, 0.14), layout.uniform(0.12, 0.35)
        foot = horizon[min(int(cx * size), size - 1)] + layout.uniform(0.0, 0.06)
        body = (np.abs(x - cx) < half_w) & (y < foot) & (y > foot - height)
        period, fill = layout.uniform(0.035, 0.06), layout.uniform(0.4, 0.6)
        windows = ((x - cx) % period < fill * period) & ((y - foot) % period < fill * period)
        wall = np.array([150, 140, 130.0]) + layout.uniform(-30, 35, size=3)
        canvas.paint(body, BUILDING, np.where(windows[..., None], [70, 85, 110.0], wall), noise=5)
    for _ in range(layout.integers(0, 4)):
        cx, radius = layout.uniform(0.05, 0.95), layout.uniform(0.05, 0.1)
        foot = horizon[min(int(cx * size), size - 1)] + layout.uniform(0.0, 0.12)
        trunk = (np.abs(x - cx) < radius * 0.2) & (y < foot) & (y > foot - 2.2 * radius)
        canopy_cy = foot - 2.2 * radius - 0.6 * radius
        canopy = ((x - cx) ** 2 + ((y - canopy_cy) / 1.3) ** 2) < radius**2
        leaves = 25 * _smooth_field(layout, size, 20)[..., None] * np.array([0.5, 1, 0.4])
        canvas.paint(trunk, TREE, np.array([100, 68, 40.0]), noise=6)
        canvas.paint(canopy, TREE, np.array([35, 95, 40.0]) * layout.uniform(0.8, 1.2) + leaves, noise=8)


def _thing_parts(class_id: int, x: np.ndarray, y: np.ndarray, cx: float, foot: float, s: float) -> list:
    """Shape family of a thing as ``[(mask, colour_role)]``; ``s`` is its height, normalised; roles index colours."""
    dx, dy = x - cx, y - foot
    if class_id == CAR:
        body = (np.abs(dx) / (1.1 * s)) ** 4 + (np.abs(dy + 0.45 * s) / (0.28 * s)) ** 4 < 1
        cabin = (np.abs(dx) / (0.6 * s)) ** 4 + (np.abs(dy + 0.8 * s) / (0.2 * s)) ** 4 < 1
        wheels = ((np.abs(dx) - 0.65 * s) ** 2 + (dy + 0.18 * s) ** 2) < (0.18 * s) ** 2
        return [(body, 0), (cabin, 1), (wheels, 2)]
    if class_id == PERSON:
        body = (dx / (0.16 * s)) ** 2 + ((dy + 0.4 * s) / (0.4 * s)) ** 2 < 1
        head = dx**2 + (dy + 0.88 * s) ** 2 < (0.12 * s) ** 2
        return [(body, 0), (head, 1)]
    if class_id == DOG:
        body = (dx / (0.5 * s)) ** 2 + ((dy + 0.6 * s) / (0.22 * s)) ** 2 < 1
        head = (dx - 0.5 * s) ** 2 + (dy + 0.85 * s) ** 2 < (0.17 * s) ** 2
        legs = (np.abs(np.abs(dx) - 0.32 * s) < 0.06 * s) & (dy < 0) & (dy > -0.6 * s)
        return [(body, 0), (head, 0), (legs, 1)]
    if class_id == BOAT:
        hull = (dy < 0) & (dy > -0.4 * s) & (np.abs(dx) < 0.9 * s + 0.6 * (-dy))
        sail = (dx > -0.05 * s) & (dy < -0.4 * s) & (dx < 0.6 * (dy + 1.3 * s))
        return [(hull, 0), (sail, 1)]
    ball = dx**2 + (dy + 0.5 * s) ** 2 < (0.5 * s) ** 2
    stripe = ball & (np.abs(np.sin((dx + dy) * 9 / s)) < 0.3)
    return [(ball, 0), (stripe, 1)]


def _thing_colours(class_id: int, layout: np.random.Generator) -> list[np.ndarray]:
    """Colours per role of ``_thing_parts``: main colour from the class palette, jittered, then fixed accents."""
    palette = THING_PALETTES[class_id]
    main = np.clip(palette[layout.integers(len(palette))] + layout.normal(0, 12, size=3), 0, 255)
    accents = {CAR: [[150, 190, 215.0], [20, 20, 20.0]], PERSON: [[235, 190, 150.0] + layout.normal(0, 15, size=3)],
               DOG: [main * 0.7], BOAT: [[250, 250, 240.0]], BALL: [[255, 255, 255.0]]}[class_id]
    return [main] + [np.asarray(a, float) for a in accents]


def _place_things(canvas: _Canvas, layout: np.random.Generator, horizon: np.ndarray) -> list[dict]:
    """Draw 1-5 thing specs standing on supporting stuff; returns specs sorted far to near."""
    specs = []
    heights = {CAR: 0.16, PERSON: 0.28, DOG: 0.16, BOAT: 0.2, BALL: 0.09}
    for _ in range(layout.integers(1, 6)):
        class_id = int(layout.choice(THING_IDS))
        candidates = layout.uniform(0.02, 0.98, size=(24, 2))
        cols = np.minimum((candidates * canvas.size).astype(int), canvas.size - 1)
        ok = np.isin(canvas.label[cols[:, 1], cols[:, 0]], THING_SUPPORT[class_id])
        if not ok.any():
            continue
        cx, foot = candidates[np.argmax(ok)]
        nearness = (foot - horizon.min()) / (1 - horizon.min())
        scale = heights[class_id] * (0.6 + 0.7 * nearness) * layout.uniform(0.85, 1.15)
        specs.append({"class_id": class_id, "cx": cx, "foot": foot, "s": scale,
                      "colours": _thing_colours(class_id, layout)})
    return sorted(specs, key=lambda spec: spec["foot"])


def _paint_things(canvas: _Canvas, specs: list[dict]) -> list[tuple[int, np.ndarray]]:
    """Paint things far to near, dropping those whose visible area is too small; returns visible masks."""
    shapes = [_thing_parts(sp["class_id"], canvas.x, canvas.y, sp["cx"], sp["foot"], sp["s"]) for sp in specs]
    keep = list(range(len(specs)))
    min_area = MIN_THING_FRACTION * canvas.size**2
    while True:
        owner = np.full(canvas.label.shape, -1)
        for k in keep:
            owner[np.logical_or.reduce([m for m, _ in shapes[k]])] = k
        visible = [k for k in keep if (owner == k).sum() >= min_area]
        if visible == keep:
            break
        keep = visible
    for k in keep:
        for mask, role in shapes[k]:
            canvas.paint(mask & (owner == k), specs[k]["class_id"], specs[k]["colours"][role], noise=7)
    return [(specs[k]["class_id"], owner == k) for k in keep]


def render_scene(seed: int, size: int = 128) -> ToyScene:
    """Render the scene of ``seed`` at ``size`` x ``size`` pixels (deterministic; same layout at every size).

    Args:
        seed: Scene seed, e.g. from ``split_seed``.
        size: Side length in pixels.

    Returns:
        The scene: RGB uint8 image, uint8 label map, thing instance masks.
    """
    layout, texture = np.random.default_rng(seed).spawn(2)
    canvas = _Canvas(size, texture)
    horizon = _draw_sky_and_ground(canvas, layout)
    _draw_background_stuff(canvas, layout, horizon)
    instances = _paint_things(canvas, _place_things(canvas, layout, horizon))
    canvas.rgb *= layout.uniform(0.9, 1.1)  # global illumination
    image = np.clip(np.rint(canvas.rgb), 0, 255).astype(np.uint8)
    return ToyScene(image=image, label=canvas.label, instances=instances)


@dataclass
class ToyWorldAdapter:
    """Input adapter over ToyWorld scenes, rendered on the fly from the item's source URL.

    Attributes:
        split: "train", "val" or "test" (disjoint seed ranges, see ``split_seed``).
        num_images: Number of items listed, indices ``0 .. num_images - 1``.
        size: Side length of the rendered images, pixels.
        seed: World seed; different worlds have different scenes for the same split and index.
        vocab: Vocabulary (name, YAML path or object) whose train ids the label maps use; its class names must
            be ``CLASS_NAMES`` in order. Resolved to a ``Vocabulary`` at construction.
    """

    split: str = "train"
    num_images: int = 64
    size: int = 128
    seed: int = 0
    vocab: str | Vocabulary = "toy"
    name: str = field(default="toyworld", init=False)

    def __post_init__(self) -> None:
        split_seed(self.split, max(self.num_images - 1, 0), self.seed)  # fail early on bad knobs
        self.vocab = resolve_vocab(self.vocab, "toy", "toyworld")
        if tuple(self.vocab.names) != CLASS_NAMES:
            raise ValueError(f"toyworld draws the classes {list(CLASS_NAMES)} but vocab {self.vocab.name!r} has "
                             f"{list(self.vocab.names)}; set vocab=toy")

    def list_items(self) -> list[ItemRef]:
        """Refs ``toy_<split>_<index:06d>`` with source ``toyworld://<split>/<index>?size=<size>&seed=<seed>``."""
        return [
            ItemRef(key=f"toy_{self.split}_{index:06d}",
                    source=f"toyworld://{self.split}/{index}?size={self.size}&seed={self.seed}")
            for index in range(self.num_images)
        ]

    def input_identity(self) -> InputIdentity:
        """The world is its config: one identity per scene from its source URL (split, index, size, seed)."""
        return refs_identity(self.list_items())

    def load(self, ref: ItemRef) -> ImageRecord:
        """Render the scene named by ``ref.source``; a malformed source becomes a record with ``error`` set."""
        meta = {"source": ref.source, "label_source": ref.label_source, "dataset": self.name, "notes": []}
        try:
            split, index, size, world_seed = parse_source(ref.source)
        except ValueError as exc:
            return failed_record(ref.key, meta, str(exc))
        scene = render_scene(split_seed(split, index, world_seed), size)
        meta |= {"orig_size": [size, size], "split": split, "index": index, "world_seed": world_seed,
                 "classes": [int(c) for c in np.unique(scene.label)], "num_instances": len(scene.instances)}
        return ImageRecord(key=ref.key, image=scene.image, label=scene.label, meta=meta)

    def instances(self, ref: ItemRef) -> list[tuple[int, np.ndarray]]:
        """Thing instances of the scene of ``ref`` as ``(class_id, (H, W) bool visible mask)``."""
        split, index, size, world_seed = parse_source(ref.source)
        return render_scene(split_seed(split, index, world_seed), size).instances


def parse_source(source: str) -> tuple[str, int, int, int]:
    """Parse ``toyworld://<split>/<index>?size=<px>&seed=<world seed>`` into (split, index, size, world_seed).

    Raises:
        ValueError: When the source is not a well-formed, in-range ToyWorld URL.
    """
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(source)
    query = parse_qs(parts.query)
    try:
        index = int(parts.path.strip("/"))
        size, world_seed = int(query.get("size", ["128"])[0]), int(query.get("seed", ["0"])[0])
    except ValueError:
        raise ValueError(f"malformed toyworld source {source!r}") from None
    if parts.scheme != "toyworld" or size < 8:
        raise ValueError(f"malformed toyworld source {source!r}")
    split_seed(parts.netloc, index, world_seed)
    return parts.netloc, index, size, world_seed
