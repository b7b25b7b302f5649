"""Tiny datasets in the official on-disk formats, generated in a test's tmp_path (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


def pattern(seed: int, size: tuple[int, int] = (48, 40)) -> np.ndarray:
    """A smooth random RGB image (w, h) -- different content per seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    channels = [np.sin(2 * np.pi * (rng.uniform(0.5, 3) * x + rng.uniform(0.5, 3) * y + rng.random()))
                for _ in range(3)]
    return ((np.stack(channels, -1) * 0.5 + 0.5) * 255).astype(np.uint8)


def noisy(image: np.ndarray, level: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(image + rng.normal(0, 12 * level, image.shape), 0, 255).astype(np.uint8)


def make_kadid(root: Path, refs: int = 6, levels: int = 5, size: tuple[int, int] = (48, 40)) -> pd.DataFrame:
    """KADID-10k layout: images/Ixx.png, images/Ixx_01_yy.png (one noise distortion) and dmos.csv."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for r in range(1, refs + 1):
        reference = pattern(r, size)
        Image.fromarray(reference).save(images / f"I{r:02d}.png")
        for level in range(1, levels + 1):
            name = f"I{r:02d}_01_{level:02d}.png"
            Image.fromarray(noisy(reference, level, seed=100 * r + level)).save(images / name)
            rows.append((name, f"I{r:02d}.png", round(5.0 - 0.75 * level + 0.05 * (r % 3), 3), 0.1))
    table = pd.DataFrame(rows, columns=["dist_img", "ref_img", "dmos", "var"])
    table.to_csv(root / "dmos.csv", index=False)
    return table


def make_koniq(root: Path, n: int = 20, size: tuple[int, int] = (48, 40)) -> pd.DataFrame:
    """KonIQ-10k layout: 1024x768/<id>.jpg, the scores CSV and the official split file."""
    folder = root / "1024x768"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name = f"{1000 + i}.jpg"
        level = i % 5
        Image.fromarray(noisy(pattern(i, size), level, seed=i)).save(folder / name, quality=95)
        mos = 4.5 - 0.7 * level
        rows.append([name, 1, 2, 3, 4, 5, 15, mos, 0.5, 25 * (mos - 1),
                     "test" if i % 5 == 0 else "validation" if i % 5 == 1 else "training"])
    columns = ["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS", "SD", "MOS_zscore", "set"]
    table = pd.DataFrame(rows, columns=columns)
    table[columns[:-1]].to_csv(root / "koniq10k_scores_and_distributions.csv", index=False)
    sets = table[["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS_zscore", "SD", "set"]]
    sets.rename(columns={"MOS_zscore": "MOS"}).to_csv(root / "koniq10k_distributions_sets.csv", index=False)
    return table


def _save(path: Path, seed: int, level: int = 0, size: tuple[int, int] = (48, 40), **kwargs: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(noisy(pattern(seed, size), level, seed)).save(path, **kwargs)


def mat_cells(names: list[str]) -> np.ndarray:
    """A MATLAB cell array of strings for scipy.io.savemat."""
    cells = np.empty((len(names), 1), dtype=object)
    for i, name in enumerate(names):
        cells[i, 0] = name
    return cells


def make_livec(root: Path, n: int = 12) -> list[str]:
    """ChallengeDB_release: Images/{t1..t7 in trainingImages/, mixed .bmp/.JPG} and Data/*.mat; returns names."""
    from scipy.io import savemat

    names = [f"t{i}.bmp" for i in range(1, 8)] + [f"{100 + i}.{'bmp' if i % 2 else 'JPG'}" for i in range(n)]
    for i, name in enumerate(names):
        folder = root / "Images" / ("trainingImages" if name.startswith("t") else "")
        _save(folder / name, seed=i, level=i % 4, format="BMP" if name.endswith("bmp") else "JPEG")
    mos = np.array([[40.0 + 3 * i for i in range(len(names))]])
    (root / "Data").mkdir(parents=True, exist_ok=True)
    savemat(root / "Data" / "AllImages_release.mat", {"AllImages_release": mat_cells(names)})
    savemat(root / "Data" / "AllMOS_release.mat", {"AllMOS_release": mos})
    savemat(root / "Data" / "AllStdDev_release.mat", {"AllStdDev_release": np.ones_like(mos)})
    return names


def make_spaq(root: Path, n: int = 6, size: tuple[int, int] = (160, 120)) -> None:
    """SPAQ: TestImage/00001.jpg ... (the first with an EXIF rotation tag) and the MOS xlsx under Annotations/."""
    for i in range(1, n + 1):
        exif = Image.Exif()
        if i == 1:
            exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
        _save(root / "TestImage" / f"{i:05d}.jpg", seed=i, level=i % 3, size=size, quality=95, exif=exif)
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"Image name": [f"{i:05d}.jpg" for i in range(1, n + 1)], "MOS": [20.0 + 10 * i for i in range(n)],
                  "Brightness": 50.0, "Colorfulness": 50.0, "Contrast": 50.0, "Noisiness": 50.0,
                  "Sharpness": 50.0}).to_excel(root / "Annotations" / "MOS and Image attribute scores.xlsx",
                                               index=False)


def make_flive(root: Path, names: list[str]) -> None:
    """FLIVE database/: labels_image.csv (name,mos) and the images in their sub-folders."""
    for i, name in enumerate(names):
        _save(root / name, seed=i, level=i % 4, quality=95)
    pd.DataFrame({"name": names, "mos": [60.0 + i for i in range(len(names))]}).to_csv(root / "labels_image.csv",
                                                                                       index=False)


LIVE_COUNTS = {"jp2k": 227, "jpeg": 233, "wn": 174, "gblur": 174, "fastfading": 174}


def write_live_mats(root: Path, entries: dict[int, tuple[str, float]], refs: list[str]) -> None:
    """dmos.mat, dmos_realigned.mat and refnames_all.mat for LIVE's 982 entries; ``entries`` maps a 0-based global
    index to (reference name, DMOS) for the distorted images, every other entry is a reference copy (orgs = 1)."""
    from scipy.io import savemat

    total = sum(LIVE_COUNTS.values())
    dmos = np.zeros((1, total))
    orgs = np.ones((1, total))
    names = [refs[i % len(refs)] for i in range(total)]
    for index, (ref, score) in entries.items():
        dmos[0, index], orgs[0, index], names[index] = score, 0, ref
    root.mkdir(parents=True, exist_ok=True)
    savemat(root / "dmos.mat", {"dmos": dmos, "orgs": orgs})
    savemat(root / "dmos_realigned.mat", {"dmos_new": dmos + 1.5, "dmos_std": np.ones_like(dmos), "orgs": orgs})
    savemat(root / "refnames_all.mat", {"refnames_all": mat_cells(names).T})


def make_live(root: Path, refs: int = 5, per_folder: int = 3) -> list[str]:
    """databaserelease2: refimgs/, jp2k/imgN.bmp, ... and the .mat files; returns the distorted image names."""
    ref_names = [f"scene{r}.bmp" for r in range(refs)]
    for r, name in enumerate(ref_names):
        _save(root / "refimgs" / name, seed=r, format="BMP")
    entries, names, start = {}, [], 0
    for folder, count in LIVE_COUNTS.items():
        for k in range(per_folder):
            index = start + 2 * k  # every other entry is distorted; the rest stay reference copies
            ref = index % refs
            _save(root / folder / f"img{index - start + 1}.bmp", seed=ref, level=k + 1, format="BMP")
            entries[index] = (ref_names[ref], 20.0 + 15 * k)
            names.append(f"{folder}/img{index - start + 1}.bmp")
        start += count
    write_live_mats(root, entries, ref_names)
    return names


CSIQ_TOKENS = {"noise": "AWGN", "jpeg": "JPEG", "jpeg 2000": "jpeg2000", "fnoise": "fnoise", "blur": "BLUR",
               "contrast": "contrast"}
CSIQ_FOLDERS = {"noise": "awgn", "jpeg": "jpeg", "jpeg 2000": "jpeg2000", "fnoise": "fnoise", "blur": "blur",
                "contrast": "contrast"}


def write_csiq_xlsx(path: Path, rows: list[tuple[str, str, int, float]]) -> None:
    """csiq.DMOS.xlsx as released: sheet ``all_by_image``, three title rows, the header on row 4."""
    from openpyxl import Workbook

    book = Workbook()
    sheet = book.active
    sheet.title = "all_by_image"
    sheet.append(["CSIQ image quality database"])
    sheet.append(["DMOS by image"])
    sheet.append([])
    sheet.append(["image", "dst_idx", "dst_type", "dst_lev", "dmos_std", "dmos"])
    for i, (image, kind, level, dmos) in enumerate(rows):
        sheet.append([int(image) if image.isdigit() else image, i % 6 + 1, kind, level, 0.05, dmos])
    book.save(path)


def make_csiq(root: Path, refs: tuple[str, ...] = ("1600", "aerial_city", "boston", "bridge")) -> None:
    """CSIQ: src_imgs/, dst_imgs/<type>/<ref>.<TOKEN>.<level>.png, csiq_label.txt and csiq.DMOS.xlsx."""
    rows = []
    for r, ref in enumerate(refs):
        _save(root / "src_imgs" / f"{ref}.png", seed=r)
        for kind in ("noise", "jpeg 2000", "blur"):
            for level in (1, 2):
                name = f"{ref}.{CSIQ_TOKENS[kind]}.{level}.png"
                _save(root / "dst_imgs" / CSIQ_FOLDERS[kind] / name, seed=r, level=level)
                rows.append((ref, kind, level, round(0.1 * level + 0.01 * r, 4)))
    lines = [f"{ref}.{CSIQ_TOKENS[kind]}.{level}.png {dmos}" for ref, kind, level, dmos in rows]
    (root / "csiq_label.txt").write_text("\n".join(lines) + "\n")
    write_csiq_xlsx(root / "csiq.DMOS.xlsx", rows)


def make_tid2013(root: Path, refs: int = 5) -> None:
    """TID2013: reference_images/, distorted_images/ with the release's mixed-case names, mos_with_names.txt."""
    lines = []
    for r in range(1, refs + 1):
        _save(root / "reference_images" / (f"I{r:02d}.BMP" if r < refs else f"i{r:02d}.bmp"), seed=r, format="BMP")
        for level in range(1, 4):
            name = f"i{r:02d}_01_{level}.bmp" if level != 2 else f"I{r:02d}_01_{level}.BMP"
            _save(root / "distorted_images" / name, seed=r, level=level, format="BMP")
            lines.append(f"{6.5 - level:.5f} {name.lower() if level == 3 else name}")  # labels not always as on disk
    (root / "mos_with_names.txt").write_text("\n".join(lines) + "\n")


def make_pipal(root: Path, refs: int = 4, per_ref: int = 3) -> None:
    """PIPAL train: Train_Ref/A0001.bmp, Train_Dist/A0001_xx_yy.bmp, Train_Label/A0001.txt (name,elo lines)."""
    (root / "Train_Label").mkdir(parents=True, exist_ok=True)
    for r in range(1, refs + 1):
        _save(root / "Train_Ref" / f"A{r:04d}.bmp", seed=r, format="BMP")
        lines = []
        for k in range(per_ref):
            name = f"A{r:04d}_{k:02d}_{k:02d}.bmp"
            _save(root / "Train_Dist" / name, seed=r, level=k, format="BMP")
            lines.append(f"{name},{1500.0 - 100 * k + r:.4f}")
        (root / "Train_Label" / f"A{r:04d}.txt").write_text("\n".join(lines) + "\n")


def make_agiqa3k(root: Path, prompts: int = 4, generators: tuple[str, ...] = ("AttnGAN", "sd1.5")) -> None:
    """AGIQA-3K: data.csv with the published columns and the images next to it."""
    rows = []
    for p in range(prompts):
        for g, generator in enumerate(generators):
            name = f"{generator}_normal_{p:03d}.jpg"
            _save(root / name, seed=p, level=g, quality=95)
            rows.append((name, f"a photo of thing {p}", "", "", "", 1.0 + p * 0.5 + g, 0.3, 2.0, 0.3))
    pd.DataFrame(rows, columns=["name", "prompt", "adj1", "adj2", "style", "mos_quality", "std_quality", "mos_align",
                                "std_align"]).to_csv(root / "data.csv", index=False)


def small_demo_checkout(root: Path) -> Path:
    """The checkout's layout in miniature: the configs and small demo sets (the full ones take minutes to build), for
    what runs as a new user runs it (the quickstart notebook, Get started's examples)."""
    import shutil

    from qmamba.data.demo import build_kadid_style, build_koniq_style

    shutil.copytree(Path(__file__).resolve().parents[1] / "configs", root / "configs")
    build_kadid_style(root / "data" / "demo" / "kadid10k", sources=("astronaut",), dead_leaves_count=2)
    build_koniq_style(root / "data" / "demo" / "koniq10k", sources=("astronaut", "coffee", "rocket"),
                      crops_per_source=2, dead_leaves_count=4, variants=6)
    return root
