"""The IQA DataModule: one or several datasets, split by protocol, one validation / test loader per dataset.

With several datasets (universal IQA) training batches come from :class:`MultiDatasetBatchSampler` (shares by
strategy, single-dataset batches, DDP sharding); scores are trained on each dataset's [0, 1] higher-is-better
scale (:class:`~qmamba.inference.scale.ScoreScale`: min-max over the dataset's known range, DMOS flipped) and
reported on the native scale. A dataset of comparisons (:mod:`qmamba.data.comparisons`) trains on pairs of images
and is evaluated on the held-out pairs between its validation (test) images, which are scored one by one.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from qmamba.errors import UsageError
from qmamba.inference.preprocessing import EvalCrops, Preprocessing
from qmamba.inference.scale import ScoreScale
from qmamba.inference.trained import DataSpec

from .catalog import DatasetError, DatasetInfo, dataset_info, load_dataset
from .checks import CheckMode, ProblemReport, check_images
from .comparisons import ComparisonSpec, components, load_comparisons
from .dataset import IQADataset, PairDataset, SeededConcat
from .sampler import MultiDatasetBatchSampler, SeededBatches, ShardSampler, Strategy, dataset_shares
from .splits import make_splits, save_splits, split_problems
from .tables import TableSpec, load_table, table_folder
from .transforms import TrainCrop

__all__ = ["DatasetConfig", "IQADataModule"]

log = logging.getLogger(__name__)


@dataclass
class DatasetConfig:
    """One dataset of a run.

    Args:
        name: registered dataset (``koniq10k``, ``kadid10k``, ...; see ``qmamba.data.DATASETS``), or any name for a
            ``table`` of your own.
        root: folder of the unpacked official release (default: the dataset's ``data/`` folder); for a table, the
            folder (or URI) its relative image paths start from (default: the table's folder), and no path may
            leave it.
        label: name used in metric keys and outputs (default: ``name``), e.g. ``demo_kadid``.
        protocol: ``auto`` (the dataset's community protocol), ``content``, ``random`` or ``official``.
        options: loader options, e.g. ``{resolution: 512x384}`` for KonIQ.
        score_range: the (low, high) scale of relabelled data; by default the dataset's own (labels outside it
            are an error). A table must declare it.
        short_side: resize images to this shorter side before training (once, into ``cache_dir``); ``auto`` is
            the dataset's default (512 for SPAQ, native resolution for the others), None keeps the originals.
        cache_dir: folder of the resized copies (default ``<root>/qmamba_short<N>``).
        table: a label table of your own instead of a registered dataset (:class:`~qmamba.data.tables.TableSpec`:
            the file, its columns, ``lower_better``, pyiqa's split files).
        comparisons: a table of comparisons instead (:class:`~qmamba.data.comparisons.ComparisonSpec`: the file, the
            two images' columns, ``p`` or ``winner``, counts); it takes no ``score_range``.
    """

    name: str
    root: str | None = None
    label: str | None = None
    protocol: Literal["auto", "content", "random", "official"] = "auto"
    options: dict[str, Any] = field(default_factory=dict)
    score_range: tuple[float, float] | None = None
    short_side: int | Literal["auto"] | None = "auto"
    cache_dir: str | None = None
    table: TableSpec | None = None
    comparisons: ComparisonSpec | None = None

    def __post_init__(self) -> None:
        if isinstance(self.table, dict):
            self.table = _from_mapping(TableSpec, self.table, f"{self.key}: table")
        if isinstance(self.comparisons, dict):
            self.comparisons = _from_mapping(ComparisonSpec, self.comparisons, f"{self.key}: comparisons")
        if self.table is not None and self.comparisons is not None:
            raise UsageError(f"{self.key}: a dataset is a table of scores or a table of comparisons, not both; make "
                             "them two datasets")
        if (self.table is not None or self.comparisons is not None) and self.options:
            raise UsageError(f"{self.key}: options are a registered dataset's loader options; a table takes none "
                             "(name its columns under table: or comparisons:)")
        if self.comparisons is not None and self.score_range is not None:
            raise UsageError(f"{self.key}: comparisons have no score scale (the model learns one from them); remove "
                             "score_range")
        if self.protocol not in PROTOCOLS:
            raise UsageError(f"{self.key}: protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if self.score_range is not None:
            span = list(self.score_range) if isinstance(self.score_range, (list, tuple)) else []
            if len(span) != 2 or not all(isinstance(v, (int, float)) for v in span) or span[0] >= span[1]:
                raise UsageError(f"{self.key}: score_range must be [low, high] with low < high, got "
                                 f"{self.score_range!r}")
            self.score_range = (float(span[0]), float(span[1]))

    @classmethod
    def from_mapping(cls, entry: DatasetConfig | dict[str, Any], index: int) -> DatasetConfig:
        """A config's ``datasets`` entry (a mapping, as YAML gives it) as a :class:`DatasetConfig`."""
        return entry if isinstance(entry, DatasetConfig) else _from_mapping(cls, entry, f"datasets[{index}]")

    @property
    def key(self) -> str:
        return self.label or self.name

    def info(self, score_range: tuple[float, float], read: TableSpec | ComparisonSpec | None = None) -> DatasetInfo:
        """The registered dataset's :class:`DatasetInfo`, or a table's on the scale in force (``score_range``), its
        protocol from the columns the table was ``read`` with (the config's and those found by their default
        names)."""
        if self.comparisons is not None:
            spec = read if isinstance(read, ComparisonSpec) else self.comparisons
            return DatasetInfo(self.key, score_range, False, "content" if spec.first_group else "random",
                               self.root or table_folder(spec.file), official_split=bool(spec.split))
        if self.table is None:
            return dataset_info(self.name)
        table = read if isinstance(read, TableSpec) else self.table
        return DatasetInfo(self.key, score_range, bool(table.lower_better), "content" if table.group else "random",
                           self.root or table_folder(table.file), official_split=table.has_split)

    def labels(self) -> tuple[pd.DataFrame, ProblemReport]:
        """The label table and the report of its unusable rows (a registered dataset's loader raises instead)."""
        if self.table is not None:
            return load_table(self.table, self.key, self.root, self.score_range)
        labels = load_dataset(self.name, self.root, self.score_range, **self.options)
        return labels, ProblemReport(self.key, len(labels))


PROTOCOLS = ("auto", "content", "random", "official")
PAIR_COLUMNS = ("first", "second", "judged", "weight")
UNFITTED = "the model's raw output: no validation epoch has fitted the comparisons' scale yet"


def _from_mapping(cls: type, entry: object, where: str) -> Any:
    """``cls(**entry)``, with an unknown or missing key as one line naming the valid ones."""
    if not isinstance(entry, dict):
        raise UsageError(f"data.init_args.{where} must be a mapping of {cls.__name__} keys, got {entry!r}")
    keys = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in entry if k not in keys]
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in entry]
    if unknown or missing:
        problem = f"unknown keys {unknown}" if unknown else f"missing keys {missing}"
        raise UsageError(f"data.init_args.{where}: {problem}; its keys are {', '.join(keys)}")
    return cls(**entry)


class IQADataModule(L.LightningDataModule):
    """Images and unit-scale scores for training; per-dataset multi-crop loaders for validation and test.

    Args:
        datasets: the datasets of the run (one for task-specific IQA, several for universal IQA), each a
            :class:`DatasetConfig` or a mapping of its keys (``name``, ``root``, ``label``, ``table``, ...).
        batch_size: training crops per batch; evaluation batches hold ``batch_size // eval_crops`` images.
        crop_size: square crop side at native resolution (224 in the paper).
        eval_crops: deterministic crops per image at validation / test time, predictions averaged.
        train_repeats: random crops per training image per epoch (DEIQT's ``PATCH_NUM``).
        test_fraction: held-out share for random / content protocols.
        val_fraction: share carved out of training for checkpoint selection; 0 validates on the test split
            (the optimistic "best epoch on test" practice of HyperIQA/DEIQT, kept for paper comparisons).
        split_seed: seed of the split (repeat a protocol with seeds 0..9).
        num_workers: data-loading processes.
        cache_images: keep decoded images in memory (each loader process holds its own copy): for small
            datasets, especially on CPUs where decoding competes with training for the cores.
        check_images: before training, ``full`` decodes every image once (catches truncated files), ``header``
            reads only sizes, ``off`` only tests that files exist. All problems are reported together.
        small_images: images with a side below ``crop_size``: ``error`` (report them) or ``drop`` (leave them
            out, logged). qmamba never pads or upscales, both of which change the quality being scored.
        sampling: each dataset's share of a training epoch: ``proportional`` to its size, ``balanced`` (equal) or
            ``temperature`` (size^(1/T)); see :mod:`qmamba.data.sampler`.
        temperature: T of the ``temperature`` strategy.
        mixed_batches: draw batches across datasets instead of one dataset per batch (the default keeps in-batch
            correlation and ranking losses meaningful: scores of different datasets are not comparable).
        epoch_samples: training crops per epoch over all devices (default: training images x train_repeats).
    """

    def __init__(
        self,
        # mappings for the CLI: jsonargparse would merge a layered config's list of dataclasses item by item into the
        # base config's (an entry without a root would inherit the base entry's), where a list of mappings replaces it
        datasets: list[dict[str, Any]] | list[DatasetConfig],
        batch_size: int = 32,
        crop_size: int = 224,
        eval_crops: int = 5,
        train_repeats: int = 1,
        test_fraction: float = 0.2,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        num_workers: int = 4,
        cache_images: bool = False,
        check_images: CheckMode = "full",
        small_images: Literal["error", "drop"] = "error",
        sampling: Strategy = "proportional",
        temperature: float = 2.0,
        mixed_batches: bool = False,
        epoch_samples: int | None = None,
    ) -> None:
        super().__init__()
        if not datasets:
            raise UsageError("data.init_args.datasets must name at least one dataset")
        for name, value in (("batch_size", batch_size), ("crop_size", crop_size), ("eval_crops", eval_crops),
                            ("train_repeats", train_repeats)):
            if value < 1:
                raise UsageError(f"data.init_args.{name} must be >= 1, got {value}")
        if num_workers < 0:
            raise UsageError("data.init_args.num_workers must be >= 0 (0 loads in the main process), got "
                             f"{num_workers}")
        for name, value in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
            if not 0 <= value < 1:
                raise UsageError(f"data.init_args.{name} must be in [0, 1), got {value}")
        if test_fraction + val_fraction >= 1:
            raise UsageError(f"data.init_args.test_fraction + val_fraction must be below 1 (something must be left "
                             f"to train on), got {test_fraction} + {val_fraction}")
        self.configs = [DatasetConfig.from_mapping(d, i) for i, d in enumerate(datasets)]
        keys = [c.key for c in self.configs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"dataset labels must be unique, got {keys}; set 'label' to tell them apart")
        self.batch_size, self.crop_size, self.eval_crops = batch_size, crop_size, eval_crops
        self.train_repeats, self.num_workers, self.cache_images = train_repeats, num_workers, cache_images
        self.test_fraction, self.val_fraction, self.split_seed = test_fraction, val_fraction, split_seed
        self.check_images, self.small_images = check_images, small_images
        self.sampling, self.temperature, self.mixed_batches = sampling, temperature, mixed_batches
        self.epoch_samples = epoch_samples
        dataset_shares([1] * len(self.configs), sampling, temperature)  # a bad strategy fails at construction
        self.names = keys
        for config in self.configs:
            if config.table is None and config.comparisons is None:
                dataset_info(config.name)  # an unknown dataset fails at construction
        kinds = {config.comparisons is not None for config in self.configs}
        if mixed_batches and len(kinds) > 1:
            raise UsageError("data.init_args.mixed_batches: a batch holds either images with scores or pairs of "
                             "images, so a run with both kinds of dataset needs mixed_batches: false")
        self.scales: list[ScoreScale] = []  # each dataset's scale in force, once its labels are read (prepare)
        self.preprocessing = Preprocessing(crop_size, eval_crops)  # the backbone's (ImageNet) normalisation
        self._splits: list[dict[str, Dataset]] | None = None
        self._tables: list[tuple[pd.DataFrame, dict[str, np.ndarray]]] = []  # what each split holds, to be saved
        self._pairs: list[dict[str, pd.DataFrame] | None] = []  # a comparisons dataset's pairs in its val / test
        self._protocols: list[str] = []  # the split protocol in force for each dataset
        self._splits_saved = False
        self._seed = 0  # set in prepare from the global seed; every DDP rank gets the same one

    @property
    def spec(self) -> DataSpec:
        """What a model trained on this data must remember: dataset names, score scales, preprocessing."""
        self.prepare()
        return DataSpec(list(self.names), list(self.scales), self.preprocessing)

    # ------------------------------------------------------------------------------------------------ setup
    def prepare(self) -> None:
        """Read every dataset's labels, check its images and split it. Every problem of every dataset is reported
        together, in one :class:`DatasetError`, before anything trains (the CLI calls this before it makes a run
        folder; ``qmamba data check`` calls it alone)."""
        if self._splits is not None:
            return
        self._seed = int(torch.initial_seed() % 2**31)  # follows seed_everything; albumentations needs it
        splits, problems = [], []
        for index, config in enumerate(self.configs):
            try:
                splits.append(self._prepare_one(index, config))
            except DatasetError as err:
                problems.append(str(err))
        if problems:
            self.scales, self._tables, self._pairs, self._protocols = [], [], [], []
            raise DatasetError("\n".join(problems))
        self._splits = splits

    def setup(self, stage: str | None = None) -> None:
        self.prepare()
        if not self._splits_saved:
            self._save_splits()

    def _prepare_one(self, index: int, config: DatasetConfig) -> dict[str, Dataset]:
        if config.comparisons is not None:
            return self._prepare_comparisons(index, config)
        labels, report = config.labels()
        # the scale in force: the dataset's, a loader option's (KonIQ's 1-5 MOS), the config's or a table's
        info = config.info(labels.attrs["score_range"], labels.attrs.get("table"))
        scale = ScoreScale(*labels.attrs["score_range"], info.lower_better)
        table = self._usable_images(config, info, labels, report)
        protocol, splits = self._split(config, info, table, report)
        self.scales.append(scale)
        self._tables.append((table, splits))
        self._pairs.append(None)
        self._protocols.append(protocol)
        targets = scale.to_unit(table["score"].to_numpy(np.float64))
        stds = table["std"].to_numpy(np.float64) / (scale.high - scale.low) if "std" in table else None
        paths = table["path"].tolist()
        cache: dict[str, np.ndarray] | None = {} if self.cache_images else None

        def subset(rows: np.ndarray, transform: Any) -> IQADataset:
            return IQADataset([paths[i] for i in rows], targets[rows], transform, index, cache,
                              None if stds is None else stds[rows])

        evaluation = EvalCrops(self.preprocessing)
        datasets = {"train": subset(splits["train"], TrainCrop(self.preprocessing, seed=self._seed + index)),
                    "val": subset(splits["val"], evaluation), "test": subset(splits["test"], evaluation)}
        log.info("%s (%s split): %s", config.key, protocol, ", ".join(f"{s} {len(v)}" for s, v in datasets.items()))
        return datasets

    def _split(self, config: DatasetConfig, info: DatasetInfo, table: pd.DataFrame,
               report: ProblemReport) -> tuple[str, dict[str, np.ndarray]]:
        """The protocol in force and each split's rows of ``table``; every problem so far raised in one report."""
        protocol = info.protocol if config.protocol == "auto" else config.protocol
        if config.protocol == "auto" and info.official_split:  # never a silent fallback from the official split
            protocol = "official"
        splits: dict[str, np.ndarray] = {}
        try:  # the usable rows are split even when others are not, so one report holds the split's problems too
            if len(table) or not report:
                splits = make_splits(table, protocol, self.split_seed, self.test_fraction, self.val_fraction)
                split_problems(table, splits, protocol, report)
        except DatasetError as err:
            if not report:
                raise DatasetError(f"{config.key}: {err}") from None
            report.add("cannot split", str(err), "")  # its message says how to fix it
        report.raise_if_any()
        if len(splits["val"]) == 0:
            log.warning("%s: no validation split; validating on the test split (best-on-test selection)", config.key)
            splits["val"] = splits["test"]
        return protocol, splits

    def _prepare_comparisons(self, index: int, config: DatasetConfig) -> dict[str, Dataset]:
        """A comparisons dataset: its images checked and split (by image), the pairs inside each split; training on
        the training pairs, evaluation on the images of a split and the pairs between them."""
        assert config.comparisons is not None
        comparisons, report = load_comparisons(config.comparisons, config.key, config.root)
        info = config.info((0.0, 1.0), comparisons.spec)
        images = self._usable_images(config, info, comparisons.images, report)
        names = comparisons.images["name"].to_numpy()
        position = pd.Series(np.arange(len(images)), index=images["name"])  # the images left after the checks
        pairs = comparisons.pairs.assign(first=position.reindex(names[comparisons.pairs["first"]]).to_numpy(),
                                         second=position.reindex(names[comparisons.pairs["second"]]).to_numpy())
        pairs = pairs.dropna(subset=["first", "second"]).astype({"first": int, "second": int})
        protocol, splits = self._split(config, info, images, report)
        side = np.full(len(images), "", dtype=object)
        for name in ("val", "test", "train"):  # without a validation split val is the test split: test it is
            side[splits[name]] = name
        within = {name: pairs[(side[pairs["first"]] == name) & (side[pairs["second"]] == name)]
                  for name in ("train", "val", "test")}
        if splits["val"] is splits["test"]:
            within["val"] = within["test"]
        crossing = len(pairs) - sum(len(within[n]) for n in ("train", "test")) - \
            (0 if within["val"] is within["test"] else len(within["val"]))
        if crossing:
            log.info("%s: %d of %d pairs compare images of two splits and are left out (no image is on two sides "
                     "of the split)", config.key, crossing, len(pairs))
        if within["train"].empty:
            raise DatasetError(f"{config.key}: no comparison has both images in the training split; give the "
                               "training images comparisons among themselves (or a split column)")
        train_images = splits["train"]
        pieces = len(np.unique(components(len(images), within["train"]["first"].to_numpy(),
                                          within["train"]["second"].to_numpy())[train_images]))
        if pieces > 1:
            log.warning("%s: the training comparisons link the %d training images in %d separate components",
                        config.key, len(train_images), pieces)
        self.scales.append(ScoreScale.fitted_scale(0.0, 1.0, UNFITTED))
        self._tables.append((images, splits))
        self._protocols.append(protocol)
        paths = images["path"].tolist()
        cache: dict[str, np.ndarray] | None = {} if self.cache_images else None
        crops = IQADataset(paths, None, TrainCrop(self.preprocessing, seed=self._seed + index), index, cache)
        train = within["train"]
        datasets: dict[str, Dataset] = {"train": PairDataset(crops, *(train[c].to_numpy() for c in PAIR_COLUMNS))}
        held_out: dict[str, pd.DataFrame] = {}
        for name in ("val", "test"):
            rows = splits[name]
            local = pd.Series(np.arange(len(rows)), index=rows)
            held_out[name] = within[name].assign(first=local[within[name]["first"]].to_numpy(),
                                                 second=local[within[name]["second"]].to_numpy())
            datasets[name] = IQADataset([paths[i] for i in rows], None, EvalCrops(self.preprocessing), index, cache)
        self._pairs.append(held_out)
        log.info("%s (%s split by image): train %d images, %d pairs; val %d, %d; test %d, %d", config.key, protocol,
                 len(train_images), len(train), len(splits["val"]), len(held_out["val"]), len(splits["test"]),
                 len(held_out["test"]))
        return datasets

    def held_out_pairs(self, split: str, index: int) -> pd.DataFrame | None:
        """The comparisons between the ``val`` / ``test`` images of dataset ``index`` (``first`` and ``second`` index
        that split's images; ``judged``, ``weight``), or None for a dataset of scores."""
        self.prepare()
        pairs = self._pairs[index]
        return None if pairs is None else pairs[split]

    def _usable_images(self, config: DatasetConfig, info: DatasetInfo, table: pd.DataFrame,
                       report: ProblemReport) -> pd.DataFrame:
        """Check every image (resizing into the cache where configured) into ``report``; the usable ones."""
        short_side = info.short_side if config.short_side == "auto" else config.short_side
        cache_dir = None
        if short_side:
            root = Path(config.root or info.default_root)
            if not config.cache_dir and "://" in str(config.root or info.default_root):
                raise DatasetError(f"{config.key}: resized copies of remote images need a local folder: set the "
                                   "dataset's cache_dir")
            cache_dir = Path(config.cache_dir) if config.cache_dir else root / f"qmamba_short{short_side}"
            try:
                cache_dir.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise DatasetError(f"{config.key}: cannot create {cache_dir} for the resized images ({err}); set "
                                   "the dataset's cache_dir to a writable folder") from err
            log.info("%s: images resized to a %d shorter side in %s (made once)", config.key, short_side, cache_dir)
        checks = check_images(table["path"].tolist(), table["name"].tolist(), mode=self.check_images,
                              min_size=self.crop_size, short_side=short_side, cache_dir=cache_dir)
        allow = ("too small",) if self.small_images == "drop" else ()
        report.add_images(checks, allow, rows=table["row"].tolist() if "row" in table else None)
        keep = np.array([c.problem is None for c in checks], bool)
        if not keep.all() and allow:
            log.warning("%s: left out %d images smaller than the %d crop (small_images: drop)", config.key,
                        sum(c.problem == "too small" for c in checks), self.crop_size)
        paths = pd.Series([c.path for c in checks], index=table.index, dtype=object)  # sources stay sources
        return table.assign(path=paths)[keep].reset_index(drop=True)

    def _save_splits(self) -> None:
        """Write each dataset's split into the run folder, once a trainer is attached."""
        trainer = self.trainer
        if trainer is None:
            return
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank must ask, or rank 0 waits forever
        if trainer.is_global_zero and log_dir:
            for key, (table, splits) in zip(self.names, self._tables, strict=True):
                save_splits(table, splits, Path(log_dir) / "splits" / f"{key}.csv")
        self._splits_saved = True

    def summary(self) -> list[str]:
        """One line per dataset: its images, scale and split (after :meth:`prepare`)."""
        self.prepare()
        lines = []
        for key, scale, (table, splits), pairs, protocol in zip(self.names, self.scales, self._tables, self._pairs,
                                                                  self._protocols, strict=True):
            direction = "lower" if scale.lower_better else "higher"
            sizes = ", ".join(f"{name} {len(rows)}" for name, rows in splits.items())
            if pairs is not None:
                lines.append(f"{key}: {len(table)} images in comparisons; {protocol} split, images {sizes}; held-out "
                             f"pairs {', '.join(f'{name} {len(p)}' for name, p in pairs.items())}")
                continue
            lines.append(f"{key}: {len(table)} images, scores {scale.low:g}-{scale.high:g} ({direction} is better); "
                         f"{protocol} split: {sizes}")
        return lines

    def split(self, name: str) -> list[IQADataset]:
        """The ``train`` / ``val`` / ``test`` dataset of every configured dataset (after ``setup``)."""
        if self._splits is None:
            self.setup()
        assert self._splits is not None
        return [s[name] for s in self._splits]  # type: ignore[misc]

    # ---------------------------------------------------------------------------------------------- loaders
    def _world(self) -> tuple[int, int]:
        """(rank, world size) of this process (a single process before a trainer is attached)."""
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        return DataLoader(dataset, num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available(), **kwargs)

    def train_sampler(self) -> MultiDatasetBatchSampler:
        """The training batch sampler of this rank (after ``setup``)."""
        sizes = [len(d) for d in self.split("train")]
        rank, world = self._world()
        return MultiDatasetBatchSampler(
            sizes, self.batch_size, self.sampling, self.temperature,
            epoch_samples=self.epoch_samples or sum(sizes) * self.train_repeats, mixed=self.mixed_batches,
            seed=self._seed, rank=rank, world_size=world, names=self.names,
        )

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        epoch = (lambda: trainer.current_epoch) if trainer is not None else None
        return self._loader(SeededConcat(self.split("train")), batch_sampler=SeededBatches(self.train_sampler(), epoch))

    def _eval_loaders(self, split: str) -> list[DataLoader]:
        batch = max(1, self.batch_size // self.eval_crops)
        rank, world = self._world()
        return [self._loader(d, batch_size=batch, sampler=ShardSampler(len(d), rank, world)) for d in self.split(split)]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")

    def predict_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")
