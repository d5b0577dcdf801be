"""Synthetic C-NMC-like cells: a stand-in data set for demos, tests and tuning. THE DATA IS SYNTHETIC.

Nothing made here is a real cell or carries any diagnostic meaning. It imitates the *format* of the C-NMC 2019
release (the layouts trainer/discovery.py reads) and, loosely, the differences the literature describes between B-ALL
lymphoblasts and normal B-lymphoid cells, so that the whole path (discover, split, train, evaluate, score) can
be exercised without the real data:

- layout: ``OUT/fold_{0,1,2}/{all,hem}/UID_<subject>_<image>_<cell>_<all|hem>.bmp``, 450x450 RGB BMP, one
  segmented, stained cell on a black background. Malignant subjects are ``1, 2, ...``, healthy ones
  ``H1, H2, ...``; the three folds hold disjoint subjects and each holds both classes.
- imbalance: each malignant subject has ``cells`` cells and each healthy subject half as many, so a data set
  with equal numbers of subjects per class has C-NMC's roughly 2:1 all:hem cell ratio (class weights matter).
- what differs: malignant cells are on average larger, with a more irregular outline, a higher
  nucleus:cytoplasm ratio, finer chromatin and more prominent (paler) nucleoli. All of these follow one hidden
  per-cell "atypia" score whose class distributions overlap (CLASS_SEPARATION), so some cells are genuinely
  ambiguous and no classifier can be perfect.
- what confounds: every subject has its own stain tint and brightness (TINT_STRENGTH, BRIGHTNESS_STRENGTH).
  Because every subject belongs to one class, a model can learn a subject's tint; a split by image rewards
  that and overstates accuracy, a split by subject does not.

Cells are drawn at a third of the output size with vectorised numpy and upscaled with Pillow, so a 450x450
cell costs a few milliseconds. Output is deterministic for a given seed (per-subject random streams).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from core.segment import CNMC_UM_PER_PX
from trainer.dataset import CLASS_NAMES, DatasetError

log = logging.getLogger(__name__)

# --- Difficulty knobs -------------------------------------------------------------------------------
# Distance between the class means of the hidden per-cell atypia score, in within-class standard
# deviations. With a perfect reader the best possible accuracy is about Phi(CLASS_SEPARATION / 2)
# (4.0 -> 97.7%); a small CNN at 64x64 lands a little below that.
CLASS_SEPARATION = 4.0
# Noise added to each visible feature independently of the atypia score, as a fraction of the distance
# between the class means of that feature (blurs what the image tells about the score).
FEATURE_NOISE = 0.15
# Per-subject stain: standard deviation of each RGB channel's gain, and of the overall brightness.
# The trade-off, measured on the default data set (12 subjects, 8 for training): at 0.10/0.12 a small
# CNN learns the training subjects' tints (a split by image scored weighted F1 0.98, held-out subjects
# 0.47 without colour jitter and 0.93 with the trainer's); at 0.05/0.06 the trainer reached 0.96.
TINT_STRENGTH = 0.05
BRIGHTNESS_STRENGTH = 0.06

# --- Cell appearance (fractions of the image side; colours in 0..255 before the stain tint) ----------
# (normal, malignant) class means; a cell's value sits between them according to its atypia.
RADIUS = (0.205, 0.255)  # cell radius: C-NMC cells cover ~15% (hem) and ~21% (all) of the image
IRREGULARITY = (0.025, 0.075)  # amplitude of the outline's harmonics, relative to the radius
NC_RATIO = (0.70, 0.86)  # nucleus radius / cell radius
NUCLEOLUS_CONTRAST = (0.05, 0.45)  # how much paler nucleoli are than the chromatin around them
CHROMATIN_CONTRAST = (0.22, 0.12)  # mature lymphocytes have coarse, clumped chromatin; blasts fine
NUCLEUS_RGB = np.array([64.0, 26.0, 82.0])
CYTOPLASM_RGB = np.array([92.0, 50.0, 118.0])
NUCLEOLUS_RGB = np.array([150.0, 95.0, 160.0])

# Cells are drawn at size // DRAW_FACTOR and upscaled; 3 keeps the nucleoli visible at 64x64 input.
DRAW_FACTOR = 3
# Healthy subjects get this fraction of the cells of malignant ones (C-NMC is roughly 2:1 all:hem).
HEALTHY_CELL_FRACTION = 0.5
FOLDS = 3
_ANGLES = 256
# The scale the cells are drawn at, in micrometres per pixel of a 450x450 image: that of the C-NMC crops they
# imitate (so a synthetic cell's size in um is a real one's; trainer.synth_fields puts them into fields by it).
SYNTH_UM_PER_PX = CNMC_UM_PER_PX


@dataclass(frozen=True)
class SynthSummary:
    """What synthesize wrote: subjects per fold, cell counts per class, and how long it took."""

    root: Path
    folds: dict[str, list[str]]
    n_all: int
    n_hem: int
    seconds: float

    @property
    def n_cells(self) -> int:
        """All cells written."""
        return self.n_all + self.n_hem

    def describe(self) -> str:
        """One line per fold and a total, for the command line."""
        lines = [f"fold_{fold}: subjects {', '.join(subjects)}" for fold, subjects in self.folds.items()]
        lines.append(
            f"{self.n_cells} synthetic cells ({self.n_all} all, {self.n_hem} hem) in {self.root} ({self.seconds:.1f} s)"
        )
        return "\n".join(lines)


def subject_tint(rng: np.random.Generator, strength: float = TINT_STRENGTH) -> np.ndarray:
    """A subject's stain: per-channel RGB gains (brightness included), around 1. ``strength`` is the standard
    deviation of each channel's gain; the brightness's scales with it (TINT_STRENGTH : BRIGHTNESS_STRENGTH)."""
    brightness = 1.0 + BRIGHTNESS_STRENGTH * (strength / TINT_STRENGTH) * rng.standard_normal()
    gains = brightness * (1.0 + strength * rng.standard_normal(3))
    return np.clip(gains, 0.5, 1.8)


def render_cell(
    rng: np.random.Generator, malignant: bool, tint: np.ndarray | None = None, size: int = 450
) -> np.ndarray:
    """One synthetic stained cell on black as a (size, size, 3) uint8 RGB array."""
    return render_cell_layers(rng, malignant, tint, size)[0]


def render_cell_layers(
    rng: np.random.Generator, malignant: bool, tint: np.ndarray | None = None, size: int = 450
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """render_cell's image (the same for the same rng state), the cell's coverage and the nucleus's coverage.

    Coverages are float32 0..1, (size, size); the nucleus's lies within the cell's. The image is the cell's colour
    premultiplied by the cell's coverage (black where there is no cell), so the cell goes onto another background
    as ``image + (1 - alpha) * background``.
    """
    draw = max(32, size // DRAW_FACTOR)
    # The hidden atypia score: class mean 0 (normal) or 1 (malignant), overlapping tails.
    atypia = float(malignant) + rng.standard_normal() / CLASS_SEPARATION

    def feature(means: tuple[float, float]) -> float:
        t = atypia + FEATURE_NOISE * rng.standard_normal()
        return means[0] + (means[1] - means[0]) * t

    radius = float(np.clip(feature(RADIUS), 0.12, 0.38))
    irregularity = float(np.clip(feature(IRREGULARITY), 0.005, 0.15))
    nc_ratio = float(np.clip(feature(NC_RATIO), 0.5, 0.95))
    nucleolus_contrast = float(np.clip(feature(NUCLEOLUS_CONTRAST), 0.0, 0.8))
    chromatin_contrast = float(np.clip(feature(CHROMATIN_CONTRAST), 0.04, 0.35))

    coords = (np.arange(draw, dtype=np.float32) + 0.5) / draw - 0.5  # image side = 1
    # Keep the whole cell inside the frame, like the segmented C-NMC crops.
    room = max(0.0, 0.5 - radius * (1 + 3 * irregularity) - 0.02)
    cx, cy = np.clip(rng.normal(0.0, 0.04, 2), -room, room)
    cell_alpha = _blob(coords, cx, cy, radius, irregularity, rng, draw)

    # The nucleus sits off-centre within the cytoplasm, as in lymphoid cells.
    nucleus_radius = nc_ratio * radius
    slack = radius - nucleus_radius
    angle = rng.uniform(0, 2 * math.pi)
    shift = slack * rng.uniform(0.2, 0.8)
    nx, ny = cx + shift * math.cos(angle), cy + shift * math.sin(angle)
    nucleus_alpha = _blob(coords, nx, ny, nucleus_radius, irregularity * 0.8, rng, draw) * cell_alpha

    # Chromatin: smooth noise, coarser (fewer, bigger clumps) for mature cells.
    grain = int(np.clip(10 + 12 * atypia, 6, 24))
    texture = 1.0 + chromatin_contrast * _smooth_noise(rng, grain, draw)

    nucleus = NUCLEUS_RGB[None, None, :] * texture[..., None]
    # Nucleoli: pale round spots inside the nucleus; more and more prominent in blasts.
    n_nucleoli = int(rng.poisson(0.4 + 1.8 * max(atypia, 0.0)))
    yy, xx = coords[:, None], coords[None, :]
    for _ in range(min(n_nucleoli, 4)):
        a, d = rng.uniform(0, 2 * math.pi), nucleus_radius * 0.55 * math.sqrt(rng.uniform())
        spot_r = nucleus_radius * rng.uniform(0.08, 0.16)
        spot = np.exp(-((xx - nx - d * math.cos(a)) ** 2 + (yy - ny - d * math.sin(a)) ** 2) / (2 * spot_r**2))
        weight = (nucleolus_contrast * spot)[..., None]
        nucleus = nucleus * (1 - weight) + NUCLEOLUS_RGB * weight

    cytoplasm = CYTOPLASM_RGB[None, None, :] * (1.0 + 0.05 * _smooth_noise(rng, 8, draw))[..., None]
    colour = cytoplasm * (1 - nucleus_alpha[..., None]) + nucleus * nucleus_alpha[..., None]
    gains = np.ones(3) if tint is None else np.asarray(tint, dtype=np.float64)
    cell_gain = gains * (1.0 + 0.04 * rng.standard_normal())  # slide-to-slide focus and illumination
    pixels = np.clip(colour * cell_alpha[..., None] * cell_gain, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    alpha, nucleus_cover = Image.fromarray(cell_alpha), Image.fromarray(nucleus_alpha)
    if draw != size:
        image = image.resize((size, size), Image.Resampling.BILINEAR)
        alpha = alpha.resize((size, size), Image.Resampling.BILINEAR)
        nucleus_cover = nucleus_cover.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image), np.asarray(alpha), np.asarray(nucleus_cover)


def _blob(
    coords: np.ndarray,
    cx: float,
    cy: float,
    radius: float,
    irregularity: float,
    rng: np.random.Generator,
    draw: int,
) -> np.ndarray:
    """Anti-aliased mask of a roundish shape whose outline wobbles with a few random harmonics."""
    theta = np.linspace(0.0, 2 * math.pi, _ANGLES, endpoint=False)
    outline = np.ones(_ANGLES)
    outline += 0.06 * rng.standard_normal() * np.cos(2 * theta + rng.uniform(0, 2 * math.pi))  # ovalness
    for k in range(2, 8):
        outline += (
            irregularity * rng.standard_normal() / math.sqrt(k - 1) * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
        )
    dx = coords[None, :] - cx
    dy = coords[:, None] - cy
    rho = np.hypot(dx, dy)
    # Interpolating the outline between sampled angles keeps steep wobbles from showing steps.
    position = (np.arctan2(dy, dx) % (2 * math.pi)) * (_ANGLES / (2 * math.pi))
    below = position.astype(np.int64) % _ANGLES
    frac = position - np.floor(position)
    edge = radius * (outline[below] * (1 - frac) + outline[(below + 1) % _ANGLES] * frac)
    return np.clip((edge - rho) * draw + 0.5, 0.0, 1.0).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, grain: int, draw: int) -> np.ndarray:
    """Zero-mean noise with about `grain` blobs across the image, upscaled smoothly to draw x draw."""
    coarse = rng.standard_normal((grain, grain)).astype(np.float32)
    smooth = Image.fromarray(coarse).resize((draw, draw), Image.Resampling.BICUBIC)
    return np.asarray(smooth)


def synthesize(
    out: Path,
    *,
    subjects: int = 12,
    cells: int = 120,
    seed: int = 0,
    size: int = 450,
    tint: float = TINT_STRENGTH,
    first_subject: int = 1,
) -> SynthSummary:
    """Write a synthetic C-NMC-layout data set under out (see the module docstring); returns a summary.

    ``tint``: how much each subject's stain differs (subject_tint's strength; 0.05 by default, 0.10 is harder: a
    model can learn the training subjects' tints, which says nothing about a new subject). ``first_subject``: the
    number of the first subject of each class (ALL subjects are named by number, normal ones H<number>); a set
    starting at 101 holds other subjects than one starting at 1, whatever the seed: held-out subjects to evaluate on."""
    out = Path(out)
    if not 0 <= tint <= 0.3:
        raise DatasetError(f"tint={tint}: choose a subject tint strength between 0 and 0.3 (default {TINT_STRENGTH})")
    if subjects < 2 * FOLDS:
        raise DatasetError(
            f"subjects={subjects}: need at least {2 * FOLDS} so that each of the {FOLDS} folds has a "
            "malignant and a healthy subject"
        )
    if cells < 2:
        raise DatasetError(f"cells={cells}: need at least 2 cells per subject")
    if size < 32:
        raise DatasetError(f"size={size}: images must be at least 32 pixels wide (C-NMC is 450)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"{out}: exists and is not an empty folder; choose a new folder for the data set")
    started = time.perf_counter()
    n_malignant = (subjects + 1) // 2
    if first_subject < 1:
        raise DatasetError(f"first_subject={first_subject}: subject numbers start at 1 or above")
    first = first_subject
    plan = [(str(i), True, i) for i in range(first, first + n_malignant)]
    plan += [(f"H{i}", False, i) for i in range(first, first + subjects - n_malignant)]
    folds: dict[str, list[str]] = {str(k): [] for k in range(FOLDS)}
    counts = {True: 0, False: 0}
    for subject, malignant, number in plan:
        fold = str((number - first) % FOLDS)
        folds[fold].append(subject)
        class_dir = out / f"fold_{fold}" / CLASS_NAMES[int(malignant)]
        class_dir.mkdir(parents=True, exist_ok=True)
        # One stream per subject: a subject's cells do not change when others are added.
        rng = np.random.default_rng([seed, int(malignant), number])
        stain = subject_tint(rng, tint)
        n = cells if malignant else max(1, round(cells * HEALTHY_CELL_FRACTION))
        for j in range(n):
            name = f"UID_{subject}_{j // 3 + 1}_{j % 3 + 1}_{CLASS_NAMES[int(malignant)]}.bmp"
            Image.fromarray(render_cell(rng, malignant, stain, size)).save(class_dir / name, "BMP")
        counts[malignant] += n
    summary = SynthSummary(
        root=out, folds=folds, n_all=counts[True], n_hem=counts[False], seconds=time.perf_counter() - started
    )
    log.info(
        "synthesized %d cells in %.1f s (%.1f ms per cell)",
        summary.n_cells,
        summary.seconds,
        1000 * summary.seconds / summary.n_cells,
    )
    return summary


def write_sample(out_dir: Path, n_cells: int, all_fraction: float, seed: int = 0, *, size: int = 450) -> list[Path]:
    """Write one synthetic slide (one subject's stain) with round(n_cells * all_fraction) malignant cells."""
    out_dir = Path(out_dir)
    if n_cells < 1:
        raise DatasetError(f"n_cells={n_cells}: a sample needs at least one cell")
    if not 0.0 <= all_fraction <= 1.0:
        raise DatasetError(f"all_fraction={all_fraction}: must be between 0 and 1")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DatasetError(f"{out_dir}: exists and is not an empty folder; choose a new folder for the sample")
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 2])
    tint = subject_tint(rng)
    n_malignant = round(n_cells * all_fraction)
    # Shuffled so that file order says nothing about the class.
    malignant = rng.permutation(np.arange(n_cells) < n_malignant)
    paths = []
    for i, is_malignant in enumerate(malignant, start=1):
        path = out_dir / f"cell_{i:04d}.bmp"
        Image.fromarray(render_cell(rng, bool(is_malignant), tint, size)).save(path, "BMP")
        paths.append(path)
    return paths
