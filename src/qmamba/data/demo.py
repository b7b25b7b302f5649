"""Two small IQA datasets built offline from scikit-image's bundled photographs, in official on-disk formats.

* ``demo_kadid`` (KADID-10k format: ``images/I01.png``, ``images/I01_01_01.png``, ``dmos.csv``): 81 references
  of 256x192 (I01-I11 one per source photograph, I12-I81 procedural dead-leaves images for content diversity) x 7
  distortion types x 5 levels = 2,835 images.
* ``demo_koniq`` (KonIQ-10k format: ``1024x768/<id>.jpg``, ``koniq10k_scores_and_distributions.csv`` and the
  official-split file ``koniq10k_distributions_sets.csv``): 93 contents (3 random crops of each photograph and 60
  dead-leaves scenes of their own) x 6 versions with 1-2 random distortions at random strengths, saved as JPEG
  = 558 images. Besides the seven synthetic distortions it has two capture distortions of its own (low-light
  noise, over-sharpening), a domain gap the KADID-style set never shows, like synthetic -> authentic.

Scores follow a documented, content-dependent rule (:func:`simulated_mos`), not the distortion level alone: a
blend of the distortion's nominal severity and the multi-scale SSIM (:func:`ms_ssim`, on luminance) between the
distorted and the pristine image, ``MOS = 1 + 4 * (0.4 * (1 - severity) + 0.6 * MS-SSIM^4)``.
For the KonIQ-style set 100 simulated votes on the 1-5 scale are drawn around that MOS (normal, sd 0.6, rounded and
clipped); ``MOS`` is their mean, ``SD`` their deviation and ``MOS_zscore = 25 * (MOS - 1)`` puts it on 0-100.
Held-out content: the KonIQ-style split file assigns whole photographs (all their crops) and scenes to train /
validation / test, and the KADID-style set is split by reference like the real dataset. Distortions were chosen so
that their strength is visible without the reference (contrast or colour changes would need the pristine image).

Each set also comes as comparisons (``comparisons.csv``, :func:`simulated_comparisons`): pairs of images of one split
and the probability that a rater prefers the first, from the two MOS through Thurstone's model with the votes' noise
(sd 0.6 on the 1-5 scale, that of the KonIQ-style votes), as a 2AFC experiment on the same images would give it. The
KADID-style set's split is the one ``configs/demo.yaml`` makes (by reference, seed 0, 25 % test, 15 % validation).
"""

from __future__ import annotations

import argparse
import io
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter

from qmamba.files.atomic import write_text_atomic

from .splits import make_splits

__all__ = ["DISTORTIONS", "IN_THE_WILD", "build_demo_datasets", "ms_ssim", "simulated_comparisons", "simulated_mos"]

# The natural photographs bundled with scikit-image (no download) plus matplotlib's sample photo; gray ones become
# gray RGB. Like KADID-10k's curated references they should be pristine natural scenes: skimage's clock (soft,
# dim), moon (blurred), hubble_deep_field (star fields look like noise) and the microscopy images are left out.
SOURCES = (
    "astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel", "motorcycle_left", "rocket",
    "grace_hopper",
)
DEAD_LEAVES = 70  # procedural references added to the 11 photographs: 81 references, as many as KADID-10k
REFERENCE_SIZE = (256, 192)  # (width, height): KADID's 4:3 aspect (512x384) at half size
KONIQ_SIZE = (256, 192)
KONIQ_DEAD_LEAVES = 60  # scenes added to the photographs' crops: 93 contents, 71 held-out groups
RATER_SD = 0.6  # one simulated vote's noise on the 1-5 scale
DEMO_SPLIT = {"seed": 0, "test_fraction": 0.25, "val_fraction": 0.15}  # configs/demo.yaml's split


def _gray_rgb(image: np.ndarray) -> np.ndarray:
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    return np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image[..., :3]


def _load_source(name: str) -> np.ndarray:
    if name == "grace_hopper":
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
            return np.asarray(Image.open(f).convert("RGB"))
    if name == "motorcycle_left":
        from skimage import data

        return np.asarray(data.stereo_motorcycle()[0])
    from skimage import data

    return _gray_rgb(np.asarray(getattr(data, name)()))


def dead_leaves(seed: int, size: tuple[int, int] = REFERENCE_SIZE) -> np.ndarray:
    """A dead-leaves image: occluding discs with power-law radii (density ~ r^-3), the scale-invariant model of
    natural images behind the texture-acutance charts of camera IQA (ISO 19567-2). Each image draws its own radius
    range and palette; each disc a colour and a gentle shading gradient, so flat areas are not perfectly flat."""
    rng = np.random.default_rng(seed)
    width, height = size
    r_min, r_max = rng.uniform(2.0, 6.0), rng.uniform(40.0, 120.0)
    canvas = np.zeros((height, width, 3), np.float64)
    covered = np.zeros((height, width), bool)
    base = rng.uniform(30, 225, size=(int(rng.integers(3, 9)), 3))  # a per-image palette
    y, x = np.mgrid[0:height, 0:width]
    while not covered.all():
        u = rng.random()  # inverse CDF of p(r) ~ r^-3 on [r_min, r_max]
        r = (r_min**-2 - u * (r_min**-2 - r_max**-2)) ** -0.5
        cy, cx = rng.uniform(-r, height + r), rng.uniform(-r, width + r)
        top, bottom = max(0, int(cy - r)), min(height, int(cy + r) + 1)
        left, right = max(0, int(cx - r)), min(width, int(cx + r) + 1)
        if top >= bottom or left >= right:
            continue
        yy, xx = y[top:bottom, left:right], x[top:bottom, left:right]
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & ~covered[top:bottom, left:right]
        if not disc.any():
            continue
        colour = np.clip(base[rng.integers(len(base))] + rng.normal(0, 25, 3), 0, 255)
        shade = 1.0 + 0.15 * ((yy - cy) * rng.normal() + (xx - cx) * rng.normal()) / max(r, 1.0)
        canvas[top:bottom, left:right][disc] = np.clip(colour[None, :] * shade[disc][:, None], 0, 255)
        covered[top:bottom, left:right] |= disc  # painted front to back: later discs lie underneath
    return canvas.round().astype(np.uint8)


def _crop(image: np.ndarray, size: tuple[int, int], where: tuple[float, float]) -> np.ndarray:
    """``size`` (w, h) crop whose top-left is at fraction ``where`` (y, x) of the free range, after shrinking
    photographs much larger than ``size`` (bicubic, only ever down) so the crop shows most of the scene."""
    width, height = size
    scale = max(width / image.shape[1], height / image.shape[0])
    if scale < 0.8:
        new_size = (round(image.shape[1] * scale / 0.8), round(image.shape[0] * scale / 0.8))
        image = np.asarray(Image.fromarray(image).resize(new_size, Image.BICUBIC))
    top = int(round(where[0] * (image.shape[0] - height)))
    left = int(round(where[1] * (image.shape[1] - width)))
    return np.ascontiguousarray(image[top : top + height, left : left + width])


# ------------------------------------------------------------------------------------------------ distortions
def _blur(image: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=0.4 + 3.2 * s)))


def _noise(image: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip(image + rng.normal(0, 3 + 32 * s, image.shape), 0, 255).astype(np.uint8)


def _jpeg(image: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=int(round(45 - 42 * s)))
    return np.asarray(Image.open(buffer).convert("RGB"))


def _pixelate(image: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    factor = 1.5 + 5 * s
    h, w = image.shape[:2]
    small = Image.fromarray(image).resize((max(1, int(w / factor)), max(1, int(h / factor))), Image.BICUBIC)
    return np.asarray(small.resize((w, h), Image.BICUBIC))


def _jpeg2000(image: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG2000", quality_mode="rates", quality_layers=[20 + 280 * s])
    return np.asarray(Image.open(buffer).convert("RGB"))


def _impulse(image: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    out = image.copy()
    mask = rng.random(image.shape[:2]) < 0.004 + 0.1 * s
    out[mask] = rng.choice([0, 255], size=(int(mask.sum()), 1))
    return out


def _motion(image: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    length = 2 + int(round(12 * s))
    kernel = np.ones(length) / length
    out = np.apply_along_axis(lambda row: np.convolve(row, kernel, mode="same"), 1, image.astype(np.float64))
    return out.clip(0, 255).astype(np.uint8)


DISTORTIONS: dict[str, Callable[[np.ndarray, float, np.random.Generator], np.ndarray]] = {
    "gaussian_blur": _blur,
    "white_noise": _noise,
    "jpeg": _jpeg,
    "pixelate": _pixelate,
    "jpeg2000": _jpeg2000,
    "impulse_noise": _impulse,
    "motion_blur": _motion,
}
LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)

def _low_light(image: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    """Underexposure pushed back up in the camera: shot and read noise amplified by the gain, luminance-dependent."""
    gain = 1.0 + 7.0 * s
    photons = image.astype(np.float64) / gain
    noisy = photons + rng.normal(0.0, 1.0, image.shape) * np.sqrt(photons * 0.6 + 1.0)
    return np.clip(noisy * gain, 0, 255).astype(np.uint8)


def _oversharpen(image: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    """A phone's aggressive unsharp mask: halos at edges and amplified texture."""
    return np.asarray(Image.fromarray(image).filter(
        ImageFilter.UnsharpMask(radius=1.5 + 2.5 * s, percent=int(150 + 650 * s), threshold=0)))


# The KonIQ-style (in-the-wild) set adds capture distortions the KADID-style set never shows: a real domain gap
# for the transfer demo, like synthetic -> authentic in the paper.
IN_THE_WILD = {**DISTORTIONS, "low_light": _low_light, "oversharpen": _oversharpen}
  # strength s of the five KADID-style levels


MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang, Simoncelli & Bovik 2003


def ms_ssim(distorted: np.ndarray, reference: np.ndarray) -> float:
    """Multi-scale SSIM on luminance: Gaussian-window SSIM at 5 dyadic scales (2x2 mean pooling between scales),
    combined as a weighted geometric mean with the standard MS-SSIM weights."""
    from skimage.metrics import structural_similarity

    def luma(x: np.ndarray) -> np.ndarray:
        return x.astype(np.float64) @ np.array([0.299, 0.587, 0.114])

    def halve(x: np.ndarray) -> np.ndarray:
        h, w = x.shape[0] // 2 * 2, x.shape[1] // 2 * 2
        return x[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))

    a, b = luma(distorted), luma(reference)
    score = 1.0
    for weight in MS_SSIM_WEIGHTS:
        ssim = structural_similarity(a, b, data_range=255.0, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False)
        score *= max(float(ssim), 1e-6) ** weight
        a, b = halve(a), halve(b)
    return score


def simulated_mos(distorted: np.ndarray, reference: np.ndarray, severity: float) -> float:
    """The demo's rating rule on the 1-5 scale: MOS = 1 + 4 * (0.4 * (1 - severity) + 0.6 * MS-SSIM^4).

    ``severity`` in [0, 1] is the distortion's nominal strength (KADID's levels are designed to be perceptually
    spaced); MS-SSIM to the pristine image makes the score depend on the content (texture masks noise, flat
    areas hide blur). The 4th power spreads the high-quality end, where MS-SSIM crowds near 1.
    """
    fidelity = float(np.clip(ms_ssim(distorted, reference), 0.0, 1.0)) ** 4
    return 1.0 + 4.0 * (0.4 * (1.0 - severity) + 0.6 * fidelity)


# ---------------------------------------------------------------------------------------------------- builders
def _kadid_reference(images: Path, r: int, source: str | int, seed: int) -> list[tuple[str, str, float, float]]:
    """Write reference ``r`` (a photograph name, or the seed of a dead-leaves image) and its 35 distorted
    versions; return their label rows. One task of :func:`build_kadid_style`'s process pool."""
    if isinstance(source, str):
        reference = _crop(_load_source(source), REFERENCE_SIZE, (0.5, 0.5))
    else:
        reference = dead_leaves(seed=source)
    ref_name = f"I{r:02d}.png"
    Image.fromarray(reference).save(images / ref_name)
    rows = []
    for d, distortion in enumerate(DISTORTIONS.values(), start=1):
        for level, strength in enumerate(LEVELS, start=1):
            distorted = distortion(reference, strength, np.random.default_rng([seed, r, d, level]))
            name = f"I{r:02d}_{d:02d}_{level:02d}.png"
            Image.fromarray(distorted).save(images / name)
            rows.append((name, ref_name, round(simulated_mos(distorted, reference, strength), 3), 0.0))
    return rows


def build_kadid_style(root: Path, sources: tuple[str, ...] = SOURCES, dead_leaves_count: int = DEAD_LEAVES,
                      seed: int = 0) -> pd.DataFrame:
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    references: list[str | int] = [*sources, *(1000 + i for i in range(dead_leaves_count))]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:  # references are independent
        jobs = [pool.submit(_kadid_reference, images, r, source, seed) for r, source in enumerate(references, 1)]
        rows = [row for job in jobs for row in job.result()]
    table = pd.DataFrame(rows, columns=["dist_img", "ref_img", "dmos", "var"])
    write_text_atomic(root / "dmos.csv", table.to_csv(index=False))
    return table


def _koniq_contents(sources: tuple[str, ...], crops_per_source: int, dead_leaves_count: int,
                    rng: np.random.Generator) -> list[tuple[str, int, int, np.ndarray]]:
    """(content group, source index, crop index, pristine image): random crops of each photograph (one group per
    photograph, so its crops share a split) and dead-leaves scenes of their own seeds (not KADID-style references)."""
    contents = []
    for s, source in enumerate(sources):
        photo = _load_source(source)
        for c in range(crops_per_source):
            contents.append((source, s, c, _crop(photo, KONIQ_SIZE, (rng.random(), rng.random()))))
    for i in range(dead_leaves_count):
        contents.append((f"dead_leaves_{i}", len(sources) + i, 0, dead_leaves(seed=2000 + i, size=KONIQ_SIZE)))
    return contents


def build_koniq_style(
    root: Path, sources: tuple[str, ...] = SOURCES, crops_per_source: int = 3,
    dead_leaves_count: int = KONIQ_DEAD_LEAVES, variants: int = 6, seed: int = 1,
) -> pd.DataFrame:
    folder = root / "1024x768"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    contents = _koniq_contents(sources, crops_per_source, dead_leaves_count, rng)
    # whole content groups (a photograph and all its crops) go to one split (held-out content), ~70 / 10 / 20 % of
    # the photographs and of the dead-leaves scenes separately, so every split holds both kinds
    split_of: dict[str, str] = {}
    for groups in (list(sources), [group for group, *_ in contents if group not in sources]):
        order = rng.permutation(len(groups))
        n_test, n_val = max(1, round(0.2 * len(groups))), max(1, round(0.1 * len(groups)))
        split_of.update({groups[i]: "test" for i in order[:n_test]})
        split_of.update({groups[i]: "validation" for i in order[n_test : n_test + n_val]})
    names = list(IN_THE_WILD)
    rows = []
    for group, s, c, pristine in contents:
        for v in range(variants):
            image, intact = pristine, 1.0
            for kind in rng.choice(names, size=1 + int(rng.random() < 0.4), replace=False):
                strength = float(rng.random())
                image = IN_THE_WILD[kind](image, strength, rng)
                intact *= 1.0 - strength
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="JPEG", quality=95)
            stored = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
            mos = simulated_mos(stored, pristine, severity=1.0 - intact)
            votes = np.clip(np.rint(rng.normal(mos, 0.6, 100)), 1, 5).astype(int)
            counts = np.bincount(votes, minlength=6)[1:]
            name = f"{10_000_000 + 1000 * s + 100 * c + v}.jpg"
            (folder / name).write_bytes(buffer.getvalue())
            mean = float(votes.mean())
            rows.append([name, *counts, counts.sum(), mean, float(votes.std()), 25.0 * (mean - 1.0),
                         split_of.get(group, "training")])
    columns = ["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS", "SD", "MOS_zscore", "set"]
    table = pd.DataFrame(rows, columns=columns)
    scores = table[columns[:-1]].round(4)
    write_text_atomic(root / "koniq10k_scores_and_distributions.csv", scores.to_csv(index=False))
    # the official split file: vote fractions, MOS on the 0-100 scale, and the set column
    sets = table[["image_name", "c1", "c2", "c3", "c4", "c5", "c_total"]].copy()
    sets[["c1", "c2", "c3", "c4", "c5"]] = sets[["c1", "c2", "c3", "c4", "c5"]].div(sets["c_total"], axis=0)
    sets["MOS"], sets["SD"], sets["set"] = table["MOS_zscore"], table["SD"], table["set"]
    write_text_atomic(root / "koniq10k_distributions_sets.csv", sets.round(4).to_csv(index=False))
    return table


def simulated_comparisons(names: pd.Series, mos: pd.Series, split: pd.Series, pairs_per_image: int = 8,
                          rater_sd: float = RATER_SD, seed: int = 0) -> pd.DataFrame:
    """Comparisons of a scored set: pairs drawn within each split (every image in about ``pairs_per_image`` of them,
    never with itself) and ``p = Phi((MOS_first - MOS_second) / (sqrt(2) * rater_sd))`` (MOS on the 1-5 scale)."""
    from scipy.stats import norm

    rng = np.random.default_rng(seed)
    rows = []
    for name in ("train", "val", "test"):
        members = np.flatnonzero((split == name).to_numpy())
        if len(members) < 2:
            continue
        count = len(members) * pairs_per_image // 2
        first = rng.choice(members, count)
        second = rng.choice(members, count)
        same = first == second
        second[same] = members[(np.searchsorted(members, second[same]) + 1) % len(members)]
        p = norm.cdf((mos.to_numpy()[first] - mos.to_numpy()[second]) / (np.sqrt(2.0) * rater_sd))
        rows.append(pd.DataFrame({"first": names.to_numpy()[first], "second": names.to_numpy()[second],
                                  "p": p.round(4), "split": name}))
    return pd.concat(rows, ignore_index=True)


def _kadid_comparisons(root: Path, table: pd.DataFrame) -> None:
    """``comparisons.csv`` of the KADID-style set, split as ``configs/demo.yaml`` splits it."""
    content = pd.DataFrame({"content": table["ref_img"]})
    splits = make_splits(content, "content", DEMO_SPLIT["seed"], DEMO_SPLIT["test_fraction"],
                         DEMO_SPLIT["val_fraction"])
    split = pd.Series("", index=table.index)
    for name, rows in splits.items():
        split.iloc[rows] = name
    pairs = simulated_comparisons("images/" + table["dist_img"], table["dmos"], split)
    write_text_atomic(root / "comparisons.csv", pairs.to_csv(index=False))


def _koniq_comparisons(root: Path, table: pd.DataFrame) -> None:
    """``comparisons.csv`` of the KonIQ-style set, in its official split."""
    split = table["set"].map({"training": "train", "validation": "val", "test": "test"})
    pairs = simulated_comparisons("1024x768/" + table["image_name"], table["MOS"], split, seed=1)
    write_text_atomic(root / "comparisons.csv", pairs.to_csv(index=False))


def build_demo_datasets(out: str | Path = "data/demo", force: bool = False) -> dict[str, Path]:
    """Build both demo datasets and their comparisons under ``out`` (each skipped when its file already exists)."""
    out = Path(out)
    targets = {"demo_kadid": out / "kadid10k", "demo_koniq": out / "koniq10k"}
    kadid, koniq = targets["demo_kadid"], targets["demo_koniq"]
    if force or not (kadid / "dmos.csv").is_file():
        build_kadid_style(kadid)
    if force or not (kadid / "comparisons.csv").is_file():
        _kadid_comparisons(kadid, pd.read_csv(kadid / "dmos.csv"))
    if force or not (koniq / "koniq10k_distributions_sets.csv").is_file():
        build_koniq_style(koniq)
    if force or not (koniq / "comparisons.csv").is_file():
        scores = pd.read_csv(koniq / "koniq10k_scores_and_distributions.csv")
        sets = pd.read_csv(koniq / "koniq10k_distributions_sets.csv")
        _koniq_comparisons(koniq, scores.assign(set=sets["set"]))
    return targets


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="qmamba demo-data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/demo", help="output folder (default: data/demo)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the label files exist")
    args = parser.parse_args(argv)
    for name, path in build_demo_datasets(args.out, args.force).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
