"""Domain randomisation as a post-processing stage, applicable to any generator's output.

``DomainRandomizer`` re-lights, textures, re-backgrounds and re-photographs candidate images,
as the seed project's domain randomisation did, so a generator with a narrow look (a clean
procedural glyph, one diffusion checkpoint) covers more of the sites' real conditions. Every
random number a candidate's effects used goes into its genotype under ``"domain"``, so
``reapply`` re-creates the pixels exactly from the undecorated image.

Effects, in the order they are applied (each strength in [0, 1]; 0 disables the effect):

- background: with probability ``background_probability`` the pixels that are "background" are
  replaced by a crop of an image from the ``backgrounds`` folder. The rule: a pixel is background
  when its largest per-channel distance to the median colour of the image's one-pixel border is
  at most ``BACKGROUND_TOLERANCE``; it is foreground from twice that distance on; in between
  the two are blended linearly, which keeps anti-aliased edges smooth.
- texture: a multiplicative low-frequency pattern (a small Gaussian grid upsampled bicubically),
  ``1 + amplitude * pattern`` with the pattern scaled to [-1, 1].
- lighting: a global gain, a colour tint (per-channel gains; on grayscale images it acts through
  the luminance weights) and a directional light (a linear brightness ramp at a random angle).
- camera: a small rotation, scale and perspective warp about the image centre (bilinear
  sampling, image edges replicated outwards).
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from coautogen_fl.generation.base import SEED_HIGH, Candidate, check_int
from coautogen_fl.generation.imageops import LUMA

#: Largest per-channel distance to the median border colour at which a pixel is background; the
#: pixel is foreground from twice this distance on (linear blend in between).
BACKGROUND_TOLERANCE = 0.1

#: Background images are stored with their shorter side at this many pixels (uint8, RGB).
BACKGROUND_SIDE = 256

#: Effect magnitudes at strength 1 (each effect scales linearly with its strength):
#: gain in [1 - 0.5, 1 + 0.5]; tint per channel in [0.8, 1.2]; directional light up to +-50 %
#: at the image corners; texture amplitude up to 50 %; rotation up to +-15 degrees; scale
#: in [0.85, 1.15]; each corner moves up to 8 % of the image side (perspective).
MAX_GAIN, MAX_TINT, MAX_LIGHT, MAX_TEXTURE = 0.5, 0.2, 0.5, 0.5
MAX_ROTATION, MAX_SCALE, MAX_CORNER = 15.0, 0.15, 0.08

#: Side of the texture's random grid is drawn from [low, high] (cells across the image).
TEXTURE_GRID = (3, 8)

#: Background crops cover at least this fraction of the stored background's shorter side.
MIN_CROP = 0.5


def _check_strength(key: str, value: float) -> float:
    """A strength (or probability) in [0, 1], named by its config key in the error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"postprocess.{key} must be a number in [0, 1] (0 disables it), got {value!r}")
    return float(value)


def load_backgrounds(folder: str | Path, side: int = BACKGROUND_SIDE) -> dict[str, np.ndarray]:
    """Every PIL-readable image under ``folder`` (recursively, hidden files skipped), as uint8
    RGB arrays with the shorter side resized to ``side``, keyed by POSIX path relative to it."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ValueError(
            f"postprocess.backgrounds: folder not found: {root}; set it to a directory of "
            "images (any format PIL reads) or to '' for no backgrounds"
        )
    images: dict[str, np.ndarray] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError):
            continue  # not an image (a README, a thumbnail cache): the folder may hold others
        factor = side / min(rgb.size)
        size = (max(1, round(rgb.size[0] * factor)), max(1, round(rgb.size[1] * factor)))
        images[relative.as_posix()] = np.asarray(rgb.resize(size, Image.Resampling.BILINEAR), dtype=np.uint8)
    if not images:
        raise ValueError(
            f"postprocess.backgrounds: no readable image in {root}; put .png/.jpg files "
            "there or set it to '' for no backgrounds"
        )
    return images


def _resize_plane(plane: np.ndarray, height: int, width: int, resample: Image.Resampling) -> np.ndarray:
    """Resize one float32 2-D array to (height, width)."""
    image = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32), mode="F")
    return np.array(image.resize((width, height), resample), dtype=np.float32)  # writable copy


def _homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 3x3 projective map taking the four points ``src`` (4, 2) to ``dst`` (4, 2)."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs.extend([u, v])
    h = np.linalg.solve(np.array(rows, dtype=np.float64), np.array(rhs, dtype=np.float64))
    return np.append(h, 1.0).reshape(3, 3)


def _sample_bilinear(planes: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Bilinear samples of (H, W, C) ``planes`` at float coordinates, edges replicated."""
    height, width = planes.shape[:2]
    xs = np.clip(xs, 0.0, width - 1.0)
    ys = np.clip(ys, 0.0, height - 1.0)
    x0 = np.minimum(np.floor(xs).astype(np.int64), width - 2) if width > 1 else np.zeros_like(xs, dtype=np.int64)
    y0 = np.minimum(np.floor(ys).astype(np.int64), height - 2) if height > 1 else np.zeros_like(ys, dtype=np.int64)
    x1, y1 = np.minimum(x0 + 1, width - 1), np.minimum(y0 + 1, height - 1)
    fx, fy = (xs - x0)[..., None], (ys - y0)[..., None]
    top = planes[y0, x0] * (1 - fx) + planes[y0, x1] * fx
    bottom = planes[y1, x0] * (1 - fx) + planes[y1, x1] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)


class DomainRandomizer:
    """Domain randomisation of candidate images; a post-processing stage (see module docstring).

    Parameters
    ----------
    lighting : float, default 0.3
        Strength of the global gain, colour tint and directional light, in [0, 1].
    texture : float, default 0.2
        Strength of the multiplicative low-frequency texture, in [0, 1].
    camera : float, default 0.2
        Strength of the rotation, scale and perspective warp, in [0, 1].
    backgrounds : str, default ""
        Folder of background images (searched recursively, loaded once); "" = no backgrounds.
    background_probability : float, default 0.5
        Fraction of candidates that get a background, in [0, 1].
    seed : int, default 0
        Seeds the numpy Generator all effect parameters are drawn from.
    """

    name = "domain"

    def __init__(
        self,
        lighting: float = 0.3,
        texture: float = 0.2,
        camera: float = 0.2,
        backgrounds: str = "",
        background_probability: float = 0.5,
        seed: int = 0,
    ) -> None:
        self.lighting = _check_strength("lighting", lighting)
        self.texture = _check_strength("texture", texture)
        self.camera = _check_strength("camera", camera)
        self.background_probability = _check_strength("background_probability", background_probability)
        self.seed = check_int("seed", seed, 0)
        self.backgrounds = str(backgrounds or "")
        self._background_images = load_backgrounds(self.backgrounds) if self.backgrounds else {}
        self._background_files = sorted(self._background_images)
        self._rng = np.random.default_rng(self.seed)

    # -- stage protocol ----------------------------------------------------------------------

    def apply(self, candidates: Sequence[Candidate]) -> list[Candidate]:
        """New candidates with randomised images; each genotype gets ``"domain": params``."""
        out = []
        for c in candidates:
            params = self.sample_params(self._rng, np.shape(c.image))
            image = self.apply_params(c.image, params)
            genotype = {**c.genotype, self.name: params}
            out.append(Candidate(c.candidate_id, c.label, image, genotype, c.parent_id, c.round, c.votes))
        return out

    def reapply(self, image: np.ndarray, genotype: dict[str, Any]) -> np.ndarray:
        """Re-create the randomised image from the undecorated ``image`` and the full genotype."""
        if self.name not in genotype:
            raise ValueError(f"genotype lacks '{self.name}': it was not made through a DomainRandomizer stage")
        return self.apply_params(image, genotype[self.name])

    # -- parameters --------------------------------------------------------------------------

    def sample_params(self, rng: np.random.Generator, shape: Sequence[int]) -> dict[str, Any]:
        """Draw every random number of one candidate's effects (JSON-serialisable).

        The draw order is fixed and does not depend on the strengths (a zero strength just
        scales its draws to the neutral value), so the same seed gives aligned parameters
        across configurations.

        Parameters
        ----------
        rng : np.random.Generator
            Source of randomness.
        shape : Sequence[int]
            The image's shape; its aspect ratio sets the background crop's.
        """

        def sym(scale: float) -> float:  # uniform in [-scale, scale]
            return float(scale * (2.0 * rng.random() - 1.0))

        height, width = int(shape[0]), int(shape[1])
        lighting = {
            "gain": 1.0 + sym(MAX_GAIN * self.lighting),
            "tint": [1.0 + sym(MAX_TINT * self.lighting) for _ in range(3)],
            "light_angle": float(rng.random() * 360.0),
            "light_amplitude": float(rng.random() * MAX_LIGHT * self.lighting),
        }
        texture = {
            "seed": int(rng.integers(SEED_HIGH)),
            "grid": int(rng.integers(TEXTURE_GRID[0], TEXTURE_GRID[1] + 1)),
            "amplitude": float(rng.random() * MAX_TEXTURE * self.texture),
        }
        camera = {
            "rotation": sym(MAX_ROTATION * self.camera),
            "scale": 1.0 + sym(MAX_SCALE * self.camera),
            "corners": [[sym(MAX_CORNER * self.camera), sym(MAX_CORNER * self.camera)] for _ in range(4)],
        }
        coin = float(rng.random())
        background: dict[str, Any] = {"coin": coin, "file": None, "crop": None}
        if self._background_files and coin < self.background_probability:
            background["file"] = self._background_files[int(rng.integers(len(self._background_files)))]
            background["crop"] = self._sample_crop(rng, background["file"], height, width)
        return {"lighting": lighting, "texture": texture, "camera": camera, "background": background}

    def _sample_crop(self, rng: np.random.Generator, file: str, height: int, width: int) -> list[float]:
        """A crop [left, top, width, height] in fractions of the stored background, with the
        image's aspect ratio."""
        bg_h, bg_w = self._background_images[file].shape[:2]
        size = MIN_CROP + (1.0 - MIN_CROP) * float(rng.random())
        # The largest box of the image's aspect inside the background, shrunk by ``size``.
        crop_h = min(bg_h, bg_w * height / width) * size
        crop_w = crop_h * width / height
        left, top = float(rng.random()) * (bg_w - crop_w), float(rng.random()) * (bg_h - crop_h)
        return [left / bg_w, top / bg_h, crop_w / bg_w, crop_h / bg_h]

    # -- effects -----------------------------------------------------------------------------

    def apply_params(self, image: np.ndarray, params: dict[str, Any]) -> np.ndarray:
        """Apply one candidate's effects; pure and deterministic (the background folder aside).

        Parameters
        ----------
        image : np.ndarray
            float in [0, 1], (H, W) or (H, W, 3).
        params : dict
            As returned by ``sample_params`` (or read back from JSON).

        Returns
        -------
        np.ndarray
            float32 in [0, 1], the input's shape.
        """
        image = np.asarray(image, dtype=np.float32)
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] != 3):
            raise ValueError(f"image must have shape (H, W) or (H, W, 3), got {image.shape}")
        gray = image.ndim == 2
        out = image[..., None] if gray else image.copy()
        if params["background"]["file"] is not None:
            out = self._composite(out, params["background"], gray)
        if params["texture"]["amplitude"] > 0:
            out = out * self._texture_gain(out.shape[:2], params["texture"])[..., None]
        out = self._light(out, params["lighting"], gray)
        out = self._warp(out, params["camera"])
        out = np.clip(out, 0.0, 1.0).astype(np.float32)
        return out[..., 0] if gray else out

    def _composite(self, planes: np.ndarray, background: dict[str, Any], gray: bool) -> np.ndarray:
        """Blend a background crop into the pixels close to the median border colour."""
        file = background["file"]
        if file not in self._background_images:
            raise ValueError(f"background '{file}' is not in postprocess.backgrounds ({self.backgrounds!r})")
        height, width = planes.shape[:2]
        stored = self._background_images[file].astype(np.float32) / 255.0
        bg_h, bg_w = stored.shape[:2]
        left, top, crop_w, crop_h = background["crop"]
        x0, y0 = int(round(left * bg_w)), int(round(top * bg_h))
        x1, y1 = max(x0 + 1, int(round((left + crop_w) * bg_w))), max(y0 + 1, int(round((top + crop_h) * bg_h)))
        crop = stored[y0:y1, x0:x1]
        scene = np.stack([_resize_plane(crop[..., c], height, width, Image.Resampling.BILINEAR) for c in range(3)], -1)
        scene = np.clip(scene, 0.0, 1.0)
        if gray:
            scene = (scene @ LUMA)[..., None]
        border = np.concatenate([planes[0], planes[-1], planes[1:-1, 0], planes[1:-1, -1]])
        distance = np.abs(planes - np.median(border, axis=0)).max(axis=-1, keepdims=True)
        alpha = np.clip(2.0 - distance / BACKGROUND_TOLERANCE, 0.0, 1.0)  # 1 = background
        return planes * (1.0 - alpha) + scene * alpha

    @staticmethod
    def _texture_gain(shape: tuple[int, int], texture: dict[str, Any]) -> np.ndarray:
        """The multiplicative texture pattern, ``1 + amplitude * pattern`` with pattern in [-1, 1]."""
        grid = int(texture["grid"])
        cells = np.random.default_rng(int(texture["seed"])).standard_normal((grid, grid)).astype(np.float32)
        pattern = _resize_plane(cells, shape[0], shape[1], Image.Resampling.BICUBIC)
        pattern /= max(float(np.abs(pattern).max()), 1e-6)
        return np.maximum(1.0 + float(texture["amplitude"]) * pattern, 0.0)

    @staticmethod
    def _light(planes: np.ndarray, lighting: dict[str, Any], gray: bool) -> np.ndarray:
        """Gain, tint (through luminance on grayscale) and a directional brightness ramp."""
        tint = np.asarray(lighting["tint"], dtype=np.float32)
        gains = np.float32(lighting["gain"]) * (np.array([LUMA @ tint], np.float32) if gray else tint)
        if not np.all(gains == 1.0):
            planes = planes * gains
        amplitude = float(lighting["light_amplitude"])
        if amplitude > 0:
            height, width = planes.shape[:2]
            theta = math.radians(float(lighting["light_angle"]))
            ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
            ramp = (xs - (width - 1) / 2) * math.cos(theta) + (ys - (height - 1) / 2) * math.sin(theta)
            ramp /= max(float(np.abs(ramp).max()), 1e-6)  # -1 on the dark side, +1 on the lit side
            planes = planes * (1.0 + amplitude * ramp)[..., None]
        return planes

    @staticmethod
    def _warp(planes: np.ndarray, camera: dict[str, Any]) -> np.ndarray:
        """Rotate and scale about the centre, then move the corners (perspective)."""
        corners = np.asarray(camera["corners"], dtype=np.float64)
        rotation, scale = float(camera["rotation"]), float(camera["scale"])
        if rotation == 0.0 and scale == 1.0 and not corners.any():
            return planes  # exactly the identity (sampling at integer points could still round)
        height, width = planes.shape[:2]
        cx, cy = (width - 1) / 2, (height - 1) / 2
        src = np.array([[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]], dtype=np.float64)
        theta = math.radians(rotation)  # positive = counter-clockwise on screen (y points down)
        rot = scale * np.array([[math.cos(theta), math.sin(theta)], [-math.sin(theta), math.cos(theta)]])
        dst = (src - [cx, cy]) @ rot.T + [cx, cy] + corners * [width, height]
        inverse = _homography(dst, src)  # output pixel -> where it comes from in the input
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
        points = np.stack([xs, ys, np.ones_like(xs)], axis=-1) @ inverse.T
        return _sample_bilinear(planes, points[..., 0] / points[..., 2], points[..., 1] / points[..., 2])


__all__ = ["DomainRandomizer", "load_backgrounds", "BACKGROUND_TOLERANCE"]
