"""Datasets and the weights/architecture split.

Small image sets (Fashion-MNIST, CIFAR) are held in memory as normalised tensors and served by
`TensorBatches`, a deterministic, seeded batch iterator with optional random-crop/flip augmentation: on a
2-core CPU this is several times faster than a DataLoader. ImageFolder data goes through a DataLoader.
"""
from __future__ import annotations

import gzip
import logging
import math
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .config import DatasetConfig
from .errors import DataError

log = logging.getLogger("fbnas")

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DATASETS = ("fashion_mnist", "cifar10", "cifar100", "imagefolder", "synthetic")


@dataclass
class TensorData:
    """Images [N, C, H, W] float32 (normalised) and labels [N] int64, in memory."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: torch.Tensor) -> "TensorData":
        return TensorData(self.x[idx], self.y[idx])


@dataclass
class DataBundle:
    name: str
    train: TensorData | Dataset  # for the weights (the whole training set when not searching)
    arch: Optional[TensorData | Dataset]  # the architecture split (20% of train) or None
    test: TensorData | Dataset
    num_classes: int
    in_channels: int
    input_size: int
    augment: bool = False
    classes: Optional[list[str]] = None  # class names in label order (None: unnamed, e.g. synthetic)
    mean: Optional[tuple[float, ...]] = None  # per-channel normalisation of [0, 1] pixels (None: no images)
    std: Optional[tuple[float, ...]] = None

    def preprocessing(self) -> dict:
        """What a deployed model expects, as stored in arch.json, the model card and ONNX metadata."""
        rec: dict = {"dataset": self.name, "layout": "NCHW", "dtype": "float32",
                     "input": [self.in_channels, self.input_size, self.input_size]}
        if self.mean is not None:
            rec.update(pixels="RGB" if self.in_channels == 3 else "grayscale" if self.in_channels == 1 else "channels",
                       scale="x / 255", mean=list(self.mean), std=list(self.std),
                       formula="(x / 255 - mean) / std per channel")
        else:
            rec["formula"] = "none: the data are generated already normalised"
        if self.classes is not None:
            rec["classes"] = list(self.classes)
        return rec


# ---------------------------------------------------------------------------------------- batches

class _Timed:
    """Seconds the consumer waited for batches (`data_seconds`: the data loading cost, per epoch in metrics.jsonl)."""

    wait_seconds: float = 0.0

    def take_wait(self) -> float:
        out, self.wait_seconds = self.wait_seconds, 0.0
        return out

    def _timed(self, it: Iterator):
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            self.wait_seconds += time.perf_counter() - t0
            yield item


class TensorBatches(_Timed):
    """Iterate (x, y) batches of a TensorData: seeded shuffling, optional pad-4 random crop + h-flip.

    `shard=(rank, world)`: `batch_size` is the global batch; every rank draws the same order (and augmentation)
    and takes its stride of each global batch, rank r the images r, r + world, ... (as DistributedSampler splits
    its indices), so the ranks' batches together are one process's batch, whatever the world size."""

    def __init__(self, data: TensorData, batch_size: int, shuffle: bool = True, seed: int = 0,
                 augment: bool = False, drop_last: bool = False, device: torch.device | str = "cpu",
                 shard: tuple[int, int] = (0, 1), pin_memory: bool = False):
        self.data, self.batch_size, self.shuffle = data, batch_size, shuffle
        self.augment, self.drop_last, self.device = augment, drop_last, torch.device(device)
        self.rank, self.world = shard
        self.pin_memory = pin_memory and self.device.type == "cuda"
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._timed(self._batches())

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.data)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            n_global = len(idx)
            part = slice(self.rank, None, self.world)
            idx = idx[part]
            x, y = self.data.x[idx], self.data.y[idx]
            if self.augment:
                x = random_crop_flip(x, self.generator, n_draws=n_global, part=part)
            if self.pin_memory:
                x, y = x.pin_memory(), y.pin_memory()
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4, n_draws: Optional[int] = None,
                     part: slice = slice(None)) -> torch.Tensor:
    """Pad-`pad` random crop and horizontal flip. The offsets and flips are drawn for `n_draws` images (default
    len(x)) and x gets those at `part` (a rank's share of a global batch draws the global batch's)."""
    n, _, h, w = x.shape
    n_draws = n if n_draws is None else n_draws
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n_draws,), generator=generator)[part]
    dx = torch.randint(0, 2 * pad + 1, (n_draws,), generator=generator)[part]
    rows = (dy[:, None] + torch.arange(h)[None, :])  # [n, h]
    cols = (dx[:, None] + torch.arange(w)[None, :])  # [n, w]
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None],
                 rows[:, None, :, None], cols[:, None, None, :]]
    flip = (torch.rand(n_draws, generator=generator) < 0.5)[part]
    out[flip] = out[flip].flip(-1)
    return out


class SeededLoader(_Timed, DataLoader):
    """A DataLoader (ImageFolder data) with TensorBatches' contract: batches on `device`, and a state_dict of its
    data order, so that a checkpoint restores it. With `shard=(rank, world)` and world > 1 the order comes from
    torch's DistributedSampler (seeded, set_epoch every pass) and `batch_size` is the global batch; workers,
    pinned memory (on CUDA) and persistent workers are DataLoader's."""

    def __init__(self, data: Dataset, batch_size: int, shuffle: bool, seed: int, drop_last: bool,
                 device: str | torch.device, workers: int, shard: tuple[int, int] = (0, 1), pin_memory: bool = False):
        rank, world = shard
        self.device = torch.device(device)
        self.epoch = 0
        kw = dict(num_workers=workers, pin_memory=pin_memory and self.device.type == "cuda",
                  persistent_workers=workers > 0)
        if world > 1:
            from torch.utils.data import DistributedSampler

            per_rank = max(1, batch_size // world)
            self.sampler_ = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed,
                                               drop_last=drop_last)
            super().__init__(data, batch_size=per_rank, sampler=self.sampler_, drop_last=drop_last, **kw)
        else:
            self.sampler_ = None
            super().__init__(data, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                             generator=torch.Generator().manual_seed(seed), **kw)

    def __iter__(self):
        if self.sampler_ is not None:
            self.sampler_.set_epoch(self.epoch)
            self.epoch += 1
        return self._timed(self._moved())

    def _moved(self):
        for x, y in DataLoader.__iter__(self):
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def state_dict(self) -> dict:
        if self.sampler_ is not None:
            return {"epoch": torch.tensor(self.epoch)}
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if self.sampler_ is not None and "epoch" in state:
            self.epoch = int(state["epoch"])
        elif self.sampler_ is None and "generator" in state:
            self.generator.set_state(state["generator"])


def make_loader(data: TensorData | Dataset, batch_size: int, shuffle: bool, seed: int = 0, augment: bool = False,
                drop_last: bool = False, device: str | torch.device = "cpu", workers: int = 0,
                shard: tuple[int, int] = (0, 1), pin_memory: bool = True):
    """Batches of `data` on `device`. `shard=(rank, world)`: `batch_size` is the global batch, this rank gets its
    1/world of every batch. `workers` < 0: automatic (0 on a CPU, up to 8 per process on CUDA); pinned memory on
    CUDA only."""
    if workers < 0:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        workers = 0 if torch.device(device).type != "cuda" else min(8, max(cpus // max(shard[1], 1) - 1, 0))
    if isinstance(data, TensorData):
        return TensorBatches(data, batch_size, shuffle, seed, augment, drop_last, device, shard, pin_memory)
    return SeededLoader(data, batch_size, shuffle, seed, drop_last, device, workers, shard, pin_memory)


# ---------------------------------------------------------------------------------------- loading

def load_dataset(name: str = "fashion_mnist", root: Optional[str] = None, download: bool = False,
                 split_arch: float = 0.0, train_subset: int = 0, test_subset: int = 0, seed: int = 0,
                 input_size: int = 32, synthetic_size: int = 2048, num_classes: int = 10,
                 in_channels: int = 3) -> DataBundle:
    """Load a dataset by name; `split_arch` > 0 holds out that fraction of train as the architecture split.

    `train_subset`/`test_subset` > 0 take a fixed, seeded random subset (for quick runs)."""
    if name == "fashion_mnist":
        train, test = _fashion_mnist(root, download)
        bundle = DataBundle(name, train, None, test, 10, 1, 28, classes=list(FASHION_MNIST_CLASSES),
                            mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)
    elif name in ("cifar10", "cifar100"):
        train, test, classes = _cifar(name, root, download)
        bundle = DataBundle(name, train, None, test, len(classes), 3, 32, augment=True, classes=classes,
                            mean=CIFAR_MEAN, std=CIFAR_STD)
    elif name == "imagefolder":
        return _imagefolder(root, input_size, split_arch, seed)
    elif name == "synthetic":
        train, test = synthetic(synthetic_size, max(synthetic_size // 4, 64), num_classes, in_channels,
                                input_size, seed)
        bundle = DataBundle(name, train, None, test, num_classes, in_channels, input_size)
    else:
        raise DataError(f"field 'data.name' is {name!r}; known datasets: {', '.join(DATASETS)}")
    g = torch.Generator().manual_seed(seed)
    if train_subset and train_subset < len(bundle.train):
        bundle.train = bundle.train.subset(torch.randperm(len(bundle.train), generator=g)[:train_subset])
    if test_subset and test_subset < len(bundle.test):
        bundle.test = bundle.test.subset(torch.randperm(len(bundle.test), generator=g)[:test_subset])
    if split_arch > 0:
        bundle.train, bundle.arch = split_tensor_data(bundle.train, split_arch, seed)
    return bundle


def load_data(cfg: DatasetConfig, seed: int, input_size: int, num_classes: int, in_channels: int) -> DataBundle:
    """The dataset of a command's `data` field (a search's DataConfig or train's DatasetConfig), for a model of
    that input and classes."""
    return load_dataset(**cfg.load_args(input_size, num_classes), seed=seed, in_channels=in_channels)


def split_tensor_data(data: TensorData, arch_fraction: float, seed: int) -> tuple[TensorData, TensorData]:
    if not 0 < arch_fraction < 1:
        raise DataError(f"field 'data.arch_fraction' must be in (0, 1), got {arch_fraction}")
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed + 1))
    n_arch = max(1, int(round(len(data) * arch_fraction)))
    return data.subset(perm[n_arch:]), data.subset(perm[:n_arch])


def _normalise(x_uint8: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    x = torch.from_numpy(x_uint8).float().div_(255.0)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (x - m) / s


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally .gz): the MNIST/Fashion-MNIST format."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read IDX file ({exc}); the file is corrupt or truncated") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: truncated IDX file ({body.size} bytes for shape {dims})")
    return body.reshape(dims).copy()


def _find_idx(dirs: Sequence[Path], stem: str) -> Optional[Path]:
    for d in dirs:
        for cand in (d / f"{stem}.gz", d / stem, d / "FashionMNIST" / "raw" / f"{stem}.gz",
                     d / "FashionMNIST" / "raw" / stem):
            if cand.is_file():
                return cand
    return None


def _fashion_mnist(root: Optional[str], download: bool) -> tuple[TensorData, TensorData]:
    if root and not download and not Path(root).is_dir():
        raise DataError(f"data.root={root}: directory not found; give the folder with the Fashion-MNIST idx files, or "
                        "drop data.root to use the installed copy")
    dirs = [Path(root)] if root else [Path(d) for d in FASHION_MNIST_DIRS]  # a given root is the only place looked
    found = {k: [_find_idx(dirs, s) for s in v] for k, v in FASHION_MNIST_FILES.items()}
    if not all(p for pair in found.values() for p in pair):
        if download:
            dest = Path(root or "data")
            try:
                import torchvision

                for train in (True, False):
                    torchvision.datasets.FashionMNIST(str(dest), train=train, download=True)
            except Exception as exc:  # network errors come in many types
                raise DataError(f"Fashion-MNIST download to {dest} failed ({type(exc).__name__}); install it with "
                                "`apt-get install dataset-fashion-mnist` or set data.root=<dir with the idx files>") from None
            found = {k: [_find_idx([dest], s) for s in v] for k, v in FASHION_MNIST_FILES.items()}
        else:
            searched = ", ".join(str(d) for d in dirs)
            raise DataError(f"Fashion-MNIST not found in {searched}; install it with "
                            "`apt-get install dataset-fashion-mnist`, set data.root=<dir with the idx .gz files>, "
                            "or pass data.download=true")
    out = []
    for split in ("train", "test"):
        img_path, lbl_path = found[split]
        images, labels = read_idx(img_path), read_idx(lbl_path)
        if images.shape[0] != labels.shape[0]:
            raise DataError(f"{img_path}: {images.shape[0]} images but {labels.shape[0]} labels in {lbl_path}")
        x = _normalise(images[:, None, :, :], FASHION_MNIST_MEAN, FASHION_MNIST_STD)
        out.append(TensorData(x, torch.from_numpy(labels.astype(np.int64))))
    return out[0], out[1]


def _cifar(name: str, root: Optional[str], download: bool) -> tuple[TensorData, TensorData, list[str]]:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    dest = root or "data"
    out = []
    for train in (True, False):
        try:
            ds = cls(dest, train=train, download=download)
        except RuntimeError:
            raise DataError(f"{name} not found under data.root={dest}; put the python-version archive there or "
                            "pass data.download=true (needs network access)") from None
        except Exception as exc:
            raise DataError(f"{name} download to {dest} failed ({type(exc).__name__}); set data.root to a local copy") from None
        x = _normalise(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)), CIFAR_MEAN, CIFAR_STD)
        out.append(TensorData(x, torch.tensor(ds.targets, dtype=torch.int64)))
    return out[0], out[1], list(ds.classes)


def _imagefolder(root: Optional[str], input_size: int, split_arch: float, seed: int) -> DataBundle:
    from torchvision import transforms as T

    if not root:
        raise DataError("field 'data.root' must name a directory with train/ and val/ class folders for imagefolder")
    base = Path(root).expanduser()
    if not (base / "train").is_dir():
        raise DataError(f"{base}: imagefolder needs {base}/train/<class>/* (and {base}/val/<class>/*)")
    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = T.Compose([T.RandomResizedCrop(input_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    test_tf = T.Compose([T.Resize(int(input_size * 1.14)), T.CenterCrop(input_size), T.ToTensor(), norm])
    train = _image_folder(base / "train", train_tf)
    val_dir = base / "val" if (base / "val").is_dir() else base / "train"
    test = _image_folder(val_dir, test_tf)
    if test.classes != train.classes:
        raise DataError(f"{val_dir}: class folders {test.classes} differ from {base / 'train'}'s {train.classes}; "
                        "give both the same class folders")
    arch = None
    if split_arch > 0:
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 1)).tolist()
        n_arch = max(1, int(round(len(train) * split_arch)))
        arch = torch.utils.data.Subset(train, perm[:n_arch])
        train = torch.utils.data.Subset(train, perm[n_arch:])
    return DataBundle("imagefolder", train, arch, test, len(test.classes), 3, input_size, classes=list(test.classes),
                      mean=IMAGENET_MEAN, std=IMAGENET_STD)


def _image_folder(path: Path, transform):
    import torchvision

    try:
        return torchvision.datasets.ImageFolder(str(path), transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:  # no class folders, or no images in them
        raise DataError(f"{path}: {str(exc).splitlines()[0]}; put images in {path}/<class name>/") from None


def synthetic(n_train: int, n_test: int, num_classes: int, channels: int, size: int,
              seed: int = 0) -> tuple[TensorData, TensorData]:
    """A learnable synthetic task: each class is a fixed random pattern plus noise."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(num_classes, channels, size, size, generator=g)

    def draw(n: int) -> TensorData:
        y = torch.randint(0, num_classes, (n,), generator=g)
        x = patterns[y] + 1.5 * torch.randn(n, channels, size, size, generator=g)
        return TensorData(x, y)

    return draw(n_train), draw(n_test)


def check_matches_space(bundle: DataBundle, in_channels: int, input_size: int, num_classes: int, space: str,
                        fix: str = "pick a matching space= or data=") -> None:
    if bundle.in_channels != in_channels or bundle.input_size != input_size:
        raise DataError(f"dataset {bundle.name} gives {bundle.in_channels}x{bundle.input_size}x{bundle.input_size} "
                        f"images but space {space} expects {in_channels}x{input_size}x{input_size}; {fix}")
    if bundle.num_classes != num_classes:
        raise DataError(f"dataset {bundle.name} has {bundle.num_classes} classes but space {space} has "
                        f"num_classes {num_classes}; {fix}")
