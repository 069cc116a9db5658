"""Typed configs (dataclasses), registered in Hydra's ConfigStore by the apps. Plain Python users build
them directly: `run_search(SearchConfig(space="fmnist", epochs=2), "runs/x")`.

The comment after each field (continued by comment-only lines right below it) is its description in
`fbnas <command> --help` (fbnas.fieldhelp); every field has one."""
from __future__ import annotations

import warnings
from dataclasses import InitVar, dataclass, field
from typing import Any, Optional

from .errors import ConfigError

ACT_CLIPS = ("max", "mse")  # activation ranges of fbnas train
# old field name -> new, per command line; the old names still work, with a warning (fbnas.apps.common.renamed)
RENAMED = {"train": {"steps_per_epoch": "max_steps_per_epoch"},
           "pareto": {"train.steps_per_epoch": "train.max_steps_per_epoch"},
           "hessian": {"dataset": "data.name", "data_root": "data.root"}}


def current_names(settings: dict) -> dict:
    """A TrainSettings dict saved under old field names (a train checkpoint, a pareto result) in the current names."""
    return {RENAMED["train"].get(k, k): v for k, v in settings.items()}


def _renamed(old: str, new: str, value: Any) -> Any:
    warnings.warn(f"field {old!r} is now {new!r}; the old name will be removed", DeprecationWarning, stacklevel=4)
    return value


@dataclass
class TrainSettings:
    """The training recipe of `fbnas train` (and of every network `fbnas pareto` trains)."""

    epochs: int = 8  # phase 1 (fake quant with BN; the whole run when quantized=False)
    fold_epochs: int = 2  # phase 2 (BN folded); the last one with frozen activation ranges
    batch_size: int = 128  # training batch size
    opt: str = "sgd"  # optimizer, a timm name (sgd | adamw | ...)
    lr: float = 0.05  # peak learning rate of phase 1
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-5  # weight decay
    sched: str = "cosine"  # learning-rate schedule, a timm name, stepped every batch
    warmup_epochs: int = 1  # linear learning-rate warm-up epochs of each phase
    min_lr: float = 1e-5  # the schedule's final learning rate
    fold_lr_scale: float = 0.1  # phase-2 learning rate = lr * fold_lr_scale
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    ema: bool = True  # evaluate and keep an EMA of the weights (timm ModelEmaV3)
    ema_decay: float = 0.998  # its decay
    quantized: bool = True  # QAT at the arch's bits, then the integer-only model; false: FP32 training
    init: str = "scratch"  # scratch | supernet (the search's shared weights) | weights (an unfolded model)
    supernet: str = ""  # search checkpoint (key 'supernet') when init=supernet
    weights: str = ""  # init=weights: an unfolded model of the same ops (model_bn.safetensors, or a float run's
    # model.safetensors), e.g. fine-tune a mixed-bit model from its trained W8A8 or FP32 version
    rounding: str = "half_even"  # integer rounding of the dyadic rescale: half_even | half_up
    act_clip: str = "mse"  # activation ranges: mse (EMA of the MSE-optimal clip at the bits) | max (EMA of min/max)
    calib_batches: int = 8  # training batches that calibrate the activation ranges after BN folding
    max_steps_per_epoch: int = 0  # >0: cap the steps per epoch (smoke tests); 0: whole epochs
    eval_batch_size: int = 500  # test-set batch size
    seed: int = 0  # seed of the weights and the data order
    accelerator: str = "auto"  # auto | cpu | cuda | cuda:N (as in `fbnas search`)
    steps_per_epoch: InitVar[Optional[int]] = None  # the old name of max_steps_per_epoch

    def __post_init__(self, steps_per_epoch: Optional[int]) -> None:
        if steps_per_epoch is not None:
            self.max_steps_per_epoch = _renamed("steps_per_epoch", "max_steps_per_epoch", steps_per_epoch)

    def check(self) -> None:
        from .quant.dyadic import check_rounding

        check_rounding(self.rounding)
        if self.init not in ("scratch", "supernet", "weights"):
            raise ConfigError(f"field 'init' is {self.init!r}; choose scratch, supernet or weights")
        if self.init == "supernet" and not self.supernet:
            raise ConfigError("init=supernet needs field 'supernet' (a search checkpoint path)")
        if self.init == "weights" and not self.weights:
            raise ConfigError("init=weights needs field 'weights' (a model_bn.safetensors or float model.safetensors)")
        if self.epochs < 0 or self.fold_epochs < 0 or self.epochs + self.fold_epochs == 0:
            raise ConfigError("fields 'epochs'/'fold_epochs' must be >= 0 and not both 0")
        if self.batch_size <= 0:
            raise ConfigError("field 'batch_size' must be positive")
        if self.act_clip not in ACT_CLIPS:
            raise ConfigError(f"field 'act_clip' is {self.act_clip!r}; choose one of {', '.join(ACT_CLIPS)}")


@dataclass
class DatasetConfig:
    """The dataset a command reads and the part of it used: the `data` field of `fbnas train` and `fbnas pareto`,
    and the base of the search's DataConfig."""

    name: str = "fashion_mnist"  # fashion_mnist | cifar10 | cifar100 | imagefolder | synthetic
    root: Optional[str] = None  # the dataset's folder (default: the installed copy; imagefolder: required)
    train_subset: int = 0  # >0: a fixed random subset of the training set (0: all)
    test_subset: int = 0  # >0: a fixed random subset of the test set (0: all)

    def load_args(self, input_size: int, num_classes: int) -> dict:
        """fbnas.data.load_dataset's arguments for a model of `input_size` and `num_classes` (imagefolder and
        synthetic data are made to fit it)."""
        return {"name": self.name, "root": self.root, "train_subset": self.train_subset,
                "test_subset": self.test_subset, "input_size": input_size, "num_classes": num_classes}


TrainData = DatasetConfig  # the name `fbnas train`'s and `fbnas pareto`'s data config has in Python code


@dataclass
class DataConfig(DatasetConfig):
    """The dataset of a search: a DatasetConfig and how the search splits and batches it."""

    train_subset: int = 10000  # >0: a fixed random subset of train (the default keeps a CPU search under 5 minutes; 0: all)
    download: bool = False  # torchvision datasets: download into root when missing
    arch_fraction: float = 0.2  # held-out share of train for the architecture steps (FBNet: 20%)
    batch_size: int = 128  # batch size of the weight and architecture steps
    eval_batch_size: int = 512  # batch size of evaluations
    augment: bool = False  # random crop and flip of the training images
    input_size: Optional[int] = None  # imagefolder / synthetic: image size (default: the space's input size)
    synthetic_size: int = 2048  # data.name=synthetic: number of random training images
    synthetic_classes: Optional[int] = None  # data.name=synthetic: number of classes (default: the space's)
    workers: int = -1  # DataLoader workers per rank (ImageFolder); -1: 0 on a CPU, up to 8 per process on CUDA
    pin_memory: bool = True  # pinned host batches on CUDA (asynchronous copies)

    def load_args(self, input_size: int, num_classes: int) -> dict:
        return {**super().load_args(self.input_size or input_size, self.synthetic_classes or num_classes),
                "download": self.download, "split_arch": self.arch_fraction, "synthetic_size": self.synthetic_size}


@dataclass
class SpaceOverride:
    """Change the space's input and classes (a derived space, named e.g. fmnist_3x32_5cls, saved as space.yaml in
    the run directory). `from_data`: take whatever the dataset gives (channels, size, classes) instead of an error."""

    num_classes: Optional[int] = None  # classes of the classifier (null: the space's)
    in_channels: Optional[int] = None  # input channels (null: the space's)
    input_size: Optional[int] = None  # input height and width (null: the space's)
    from_data: bool = False  # take channels, size and classes from the dataset


@dataclass
class HessianConfig:
    """The Hessian-trace penalty of a search (docs/hessian.md)."""

    gamma: float = 0.0  # weight of the Hessian-trace quantization penalty (0: off)
    refresh_every: int = 200  # steps between trace refreshes (also refreshed at the end of warm-up)
    target_rel_se: float = 0.1  # Hutchinson probes stop at this relative standard error of each trace
    max_probes: int = 64  # ... or after this many probes
    batches: int = 2  # training batches each refresh averages over


@dataclass
class ObjectiveConfig:
    """The search loss: cross-entropy and a latency penalty (docs/search.md)."""

    kind: str = "multiplicative"  # multiplicative (FBNet) | additive | target | none
    alpha: float = 0.2  # multiplicative: CE * alpha * (log LAT / log ref)^beta
    beta: float = 0.6  # multiplicative: the exponent (larger: faster nets)
    lam: float = 0.2  # additive: CE + lam * (LAT / ref - 1)
    limit_ms: Optional[float] = None  # kind=target: keep the derived net's latency under this (ms)
    eta: float = 0.05  # dual-ascent step of the target multiplier
    ref_ms: Optional[float] = None  # latency reference; default: E[LAT] of the uniform supernet
    hessian: HessianConfig = field(default_factory=HessianConfig)  # the Hessian-trace penalty


@dataclass
class OptimConfig:
    """Optimizers of the search: SGD for the weights, Adam for the architecture logits."""

    w_lr: float = 0.1  # weights: SGD learning rate (cosine schedule)
    w_momentum: float = 0.9  # weights: SGD momentum
    w_weight_decay: float = 1e-4  # weights: weight decay
    arch_lr: float = 0.01  # architecture logits: Adam learning rate
    arch_weight_decay: float = 5e-4  # architecture logits: weight decay
    grad_clip: float = 5.0  # weights: gradient-norm clip (0: none)


@dataclass
class DeriveConfig:
    """How the final architecture is read from the architecture logits."""

    method: str = "argmax"  # argmax | sample
    k: int = 8  # sample: architectures drawn from softmax(theta), best by val loss and latency kept
    eval_batches: int = 4  # sample: validation batches that score each drawn architecture
    calibration_batches: int = 4  # training batches that re-estimate BN statistics of an evaluated path


@dataclass
class WandbConfig:
    """wandb logging (logger=wandb); the run id is kept in the run directory, so a resume continues the same run."""

    project: str = "fbnas"  # wandb project
    mode: str = "offline"  # offline | online | disabled
    entity: Optional[str] = None  # wandb entity (team or user; null: wandb's default)


@dataclass
class SearchConfig:
    """`fbnas search`: the differentiable architecture and bit-width search."""

    space: str = "fmnist"  # the search space: a name in search_spaces/ (fbnas list spaces) or a YAML path
    space_override: SpaceOverride = field(default_factory=SpaceOverride)  # the space's input and classes changed
    device: Any = "sd835"  # the target device: a name in conf/device/, or its mapping (the Hydra group)
    device_file: Optional[str] = None  # a device YAML elsewhere (device=path.yaml sets this)
    lut: Optional[str] = None  # a latency-table path; default latency_tables/<space>__<device>.json
    mode: str = "soft"  # soft (FBNet, all paths) | hard (straight-through, one path) | two_path (two mixed)
    anchor_steps: Optional[int] = None  # two_path: forwards each layer's first op (the anchor) is held while the
    # second is drawn every forward; 1: both drawn every forward; null: the mode's default (fbnas.supernet.ANCHOR_STEPS)
    bit_sampling: str = "hard"  # soft (EdMIPS mixing of every bit option) | hard (one option, straight-through)
    quantized: bool = True  # search bit-widths with fake-quantized ops; false: float ops only
    epochs: int = 6  # epochs of the search, warm-up included
    warmup_epochs: int = 2  # first epochs train the weights only
    max_steps_per_epoch: int = 0  # >0: cap the weight steps per epoch
    tau: float = 5.0  # initial Gumbel-softmax temperature
    tau_decay: float = 0.956  # per epoch (FBNet's schedule, made for ~90 epochs); used when tau_final=null
    tau_final: Optional[float] = 0.5  # decay geometrically to this temperature at the last epoch (overrides
    # tau_decay; null: FBNet's tau_decay per epoch, which leaves a short search at tau ~4, where the argmax never
    # separates)
    seed: int = 0  # seed of the weights, the Gumbel noise and the data order
    accelerator: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # bf16 autocast on CUDA: ~half the memory, default step 1.1x faster than amp=false (H200)
    cuda_graph: bool = True  # on CUDA with mode=soft, replay each step's forward and backward as a CUDA graph
    channels_last: Optional[bool] = None  # NHWC tensors; null: where steps replay CUDA graphs (cuDNN's NHWC
    # BatchNorm and depthwise kernels: the default step 1.5x the reference's speed on an H200), else NCHW
    threads: int = 0  # CPU threads (0: torch default)
    dist_timeout_s: float = 300.0  # under torchrun: rendezvous and collective timeout (a lost rank ends the job)
    resume: bool = False  # continue the run in hydra.run.dir from its checkpoint
    logger: str = "none"  # none | wandb
    progress: bool = True  # a progress bar per epoch
    report: bool = True  # the command line writes report.md and plots into the run directory (fbnas report)
    data: DataConfig = field(default_factory=DataConfig)  # the dataset
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)  # the loss
    optim: OptimConfig = field(default_factory=OptimConfig)  # the optimizers
    derive: DeriveConfig = field(default_factory=DeriveConfig)  # the final architecture
    wandb: WandbConfig = field(default_factory=WandbConfig)  # logger=wandb settings


@dataclass
class TrainConfig(TrainSettings):
    """`fbnas train`: the recipe (TrainSettings) and what the command line adds."""

    arch: str = "???"  # the architecture to train: an arch.json (a search run's, or fbnas quantize ilp's)
    resume: bool = False  # continue the run in hydra.run.dir from its checkpoint
    threads: int = 0  # CPU threads (0: torch default)
    progress: bool = True  # a progress bar per epoch
    logger: str = "none"  # none | wandb
    dist_timeout_s: float = 300.0  # under torchrun: rendezvous and collective timeout (docs/distributed.md)
    data: DatasetConfig = field(default_factory=DatasetConfig)  # the dataset
    wandb: WandbConfig = field(default_factory=WandbConfig)  # logger=wandb settings


@dataclass
class HessianData:
    """The images the Hessian traces average over."""

    name: Optional[str] = None  # fashion_mnist | cifar10 | cifar100 | imagefolder | synthetic (default: the
    # search's dataset, else by space)
    root: Optional[str] = None  # the dataset's folder (default: the search's, else the installed copy)


@dataclass
class HessianRunConfig:
    """`fbnas hessian`: per-layer Hessian traces of a trained child or of every op of a search checkpoint."""

    checkpoint: Optional[str] = None  # a search checkpoint (runs/.../checkpoints/last.pt): traces of every op
    arch: Optional[str] = None  # or an arch.json ...
    weights: Optional[str] = None  # ... and its model_bn.safetensors (a QAT run) or model.safetensors (a float run)
    out_dir: Optional[str] = None  # default: the folder of the weights (the run folder for a checkpoint)
    data: HessianData = field(default_factory=HessianData)  # the dataset
    batches: int = 4  # training batches the traces average over
    batch_size: int = 128  # their batch size
    target_rel_se: float = 0.05  # Hutchinson probes stop at this relative standard error of each trace
    max_probes: int = 400  # ... or after this many probes
    min_probes: int = 24  # ... and not before this many
    seed: int = 0  # seed of the probes and the batches
    method: str = "auto"  # auto | loop | batched[:K] | func[:K] (how Hessian-vector products are batched)
    accelerator: str = "auto"  # auto | cpu | cuda[:i]
    bits: Optional[list] = None  # bit-widths for omega; default: the space's weight bits
    plot: bool = True  # write hessian.png next to hessian.json
    threads: int = 0  # CPU threads (0: torch default)
    dataset: InitVar[Optional[str]] = None  # the old name of data.name
    data_root: InitVar[Optional[str]] = None  # the old name of data.root

    def __post_init__(self, dataset: Optional[str], data_root: Optional[str]) -> None:
        if dataset is not None:
            self.data.name = _renamed("dataset", "data.name", dataset)
        if data_root is not None:
            self.data.root = _renamed("data_root", "data.root", data_root)


@dataclass
class ParetoConfig:
    """`fbnas pareto`: train searched networks and baselines with one recipe; accuracy vs device latency."""
    runs: list[str] = field(default_factory=list)  # search run dirs, multirun (sweep) dirs or arch.json files
    baselines: list[str] = field(default_factory=lambda: ["random:12", "handcrafted", "uniform_bits"])  # random:N
    # (N random nets per budget) | handcrafted (one op in every layer, e.g. MobileNetV2-like, at W8A8/W4A8) |
    # uniform_bits (each found net at W8A8 and W4A8)
    space: str = "fmnist"  # the search space of the baselines (as in `fbnas search`)
    device: Any = "sd835"  # the device whose latency table prices every network (as in `fbnas search`)
    device_file: Optional[str] = None  # a device YAML elsewhere (device=path.yaml sets this)
    lut: Optional[str] = None  # a latency-table path; default latency_tables/<space>__<device>.json
    budgets: list[float] = field(default_factory=list)  # latency budgets of random:N (empty: the runs' limit_ms)
    budget_unit: str = "ms"  # ms | mbv2 (fractions of the MobileNetV2-like W8A8 net's latency)
    budget_tolerance: float = 0.05  # random nets are within +-this fraction of their budget
    random_seed: int = 0  # seed of the random architectures
    random_max_tries: int = 200000  # random architectures drawn per budget before giving up
    seeds: list[int] = field(default_factory=lambda: [0, 1])  # training seeds of every network
    workers: int = 1  # parallel training processes (0: in this process)
    threads: int = 0  # torch threads per worker (0: CPU cores / workers)
    progress: bool = True  # a progress bar over the trainings
    train: TrainSettings = field(default_factory=TrainSettings)  # the one recipe (train.seed: use 'seeds')
    data: DatasetConfig = field(default_factory=DatasetConfig)  # the dataset of every training


@dataclass
class LutConfig:
    """`fbnas lut <action>`: build, check, show and use latency tables."""

    action: str = "check"  # set by the sub-command: build | check | show | predict | export-ops | import | ...
    space: str = "fmnist"  # the search space whose op shapes the table covers
    device: Any = None  # the target device: a name in conf/device/ (the Hydra group)
    device_file: Optional[str] = None  # a device YAML elsewhere (device=path.yaml sets this)
    table: Optional[str] = None  # table file to read (default latency_tables/<space>__<device>.json)
    out: Optional[str] = None  # table file to write (build, import)
    force: bool = False  # build: replace a measured/imported table
    repeats: Optional[int] = None  # measured build: timed runs per op (default: the device's)
    warmup: Optional[int] = None  # measured build: untimed runs per op first (default: the device's)
    archs: Optional[str] = None  # predict: arch.json, or lines of arch.json paths / ops per layer
    w_bits: Optional[int] = None  # predict: weight bits of ops given without bits (default: the space's max)
    a_bits: Optional[int] = None  # predict: activation bits of ops given without bits (default: the space's max)
    filter: str = ""  # show: only keys containing this text
    limit: int = 0  # show: at most this many rows (0: all)
    out_dir: Optional[str] = None  # export-ops: default lut_ops/<space>
    csv: Optional[str] = None  # import: the measurements
    n: int = 20  # export-archs: how many architectures
    seed: int = 0  # export-archs: random architectures' seed
    precision: str = "int8"  # export-archs, calibrate: int8 (the QDQ graph fbnas export ships) | fp32
    measurements: Optional[str] = None  # calibrate: CSV `arch,ms` of whole-model timings


@dataclass
class QuantizeData:
    """The test images of `fbnas quantize compare | onnx`."""

    name: str = "fashion_mnist"  # fashion_mnist | cifar10 | cifar100 | imagefolder | synthetic
    root: Optional[str] = None  # the dataset's folder (default: the installed copy; imagefolder: required)


@dataclass
class QuantizeConfig:
    """`fbnas quantize <action>`: the integer-only model of a trained run and its checks."""

    action: str = ""  # set by the sub-command: convert | compare | ilp | onnx
    run: str = ""  # a `fbnas train` run directory
    weights: str = ""  # folded model (default: <run>/model.safetensors)
    arch: str = ""  # arch.json (default: the one stored in the weights)
    out: str = ""  # convert: output dir; compare: markdown report; ilp: new arch.json; onnx: .onnx path
    rounding: str = "half_even"  # integer rounding of the dyadic rescale: half_even | half_up
    samples: int = 256  # compare/onnx: test images (onnx: 0 = the whole test set)
    mode: str = "qlinear"  # onnx: qlinear | qdq | accumulators
    lsb_samples: int = 1000  # onnx qlinear/qdq: images whose every tensor is compared (top-1 uses all `samples`)
    exact_branches: bool = False  # onnx: requantize add/concat branches exactly (slower graph; see onnx_graph)
    align: bool = True  # onnx: check (and write) the int8-kernel layout that `fbnas export` ships (quant.align)
    bits: list = field(default_factory=lambda: [8, 4])  # compare: naive-vs-integer at these w/a bits
    data: QuantizeData = field(default_factory=QuantizeData)  # the test images
    hessian: str = ""  # ilp: fbnas-hessian/1 traces (else weight perturbation of `weights`)
    size_kb: float = 0.0  # ilp: limit on the weights' size in KB (0: none)
    bops: float = 0.0  # ilp: limit on bit operations (0: none)
    latency_ms: float = 0.0  # ilp: limit on the latency on `device` in ms (0: none)
    size_ratio: float = 0.0  # ilp: limits relative to the W8A8 version of the architecture (0: none)
    bops_ratio: float = 0.0  # ilp: BOPs limit relative to the W8A8 version (0: none)
    latency_ratio: float = 0.0  # ilp: latency limit relative to the W8A8 version (0: none)
    device: Any = "bitfusion"  # ilp: latency device, the conf/device/ Hydra group (device=<name> or device=<path.yaml>)
    device_file: Optional[str] = None  # set by device=<path.yaml>
    lut: str = ""  # ilp: latency table file (default latency_tables/<space>__<device>.json, else built analytically)
    opset: int = 21  # onnx: ONNX opset of the written graph


@dataclass
class ExportConfig:
    """`fbnas export`: deployable files of a trained model."""

    run: str = "???"  # a finished `fbnas train` run directory
    out: str = ""  # default: <run>/export
    formats: list = field(default_factory=lambda: ["all"])  # arch safetensors pt2 onnx_fp32 onnx_qdq onnx_qlinear card
    # (all: every one the run has)
    align: bool = True  # quantized ONNX: zero channels for onnxruntime's int8 kernels (fbnas.quant.align)


@dataclass
class ReportConfig:
    """`fbnas report`: report.md and plots of a search, or sweep.md and sweep.png of a multirun."""

    run: str = ""  # a `fbnas search` run directory (metrics.jsonl, arch.json)
    sweep: str = ""  # or a `fbnas search -m` directory (runs/sweeps/<time>: one job per sub-directory)
    out: str = ""  # default: the run or sweep directory
