"""Typed configs (dataclasses), registered in Hydra's ConfigStore by the apps. Plain Python users build
them directly: `run_search(SearchConfig(space="fmnist", epochs=2), "runs/x")`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import ConfigError

ACT_CLIPS = ("max", "mse")  # activation ranges of fbnas train



@dataclass
class TrainSettings:
    epochs: int = 8  # phase 1 (fake quant with BN; the whole run when quantized=False)
    fold_epochs: int = 2  # phase 2 (BN folded); the last one with frozen activation ranges
    batch_size: int = 128
    opt: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-5
    sched: str = "cosine"
    warmup_epochs: int = 1
    min_lr: float = 1e-5
    fold_lr_scale: float = 0.1  # phase-2 learning rate = lr * fold_lr_scale
    label_smoothing: float = 0.0
    ema: bool = True
    ema_decay: float = 0.998
    quantized: bool = True
    init: str = "scratch"  # scratch | supernet | weights
    supernet: str = ""  # search checkpoint (key 'supernet') when init=supernet
    weights: str = ""  # init=weights: an unfolded model of the same ops (model_bn.safetensors, or a float run's
    # model.safetensors), e.g. fine-tune a mixed-bit model from its trained W8A8 or FP32 version
    rounding: str = "half_even"
    act_clip: str = "mse"  # activation ranges: mse (EMA of the MSE-optimal clip at the bits) | max (EMA of min/max)
    calib_batches: int = 8
    steps_per_epoch: int = 0  # 0 = whole epochs (a limit is for smoke tests)
    eval_batch_size: int = 500
    seed: int = 0
    accelerator: str = "auto"  # auto | cpu | cuda | cuda:N (as in `fbnas search`)

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
class DataConfig:
    name: str = "fashion_mnist"  # fashion_mnist | cifar10 | cifar100 | imagefolder | synthetic
    root: Optional[str] = None
    download: bool = False
    arch_fraction: float = 0.2  # held-out share of train for the architecture steps (FBNet: 20%)
    train_subset: int = 16000  # >0: a fixed random subset of train (the default keeps a CPU search in minutes; 0: all)
    test_subset: int = 0
    batch_size: int = 128
    eval_batch_size: int = 512
    augment: bool = False
    input_size: Optional[int] = None  # imagefolder / synthetic: image size (default: the space's input size)
    synthetic_size: int = 2048
    synthetic_classes: Optional[int] = None  # default: the space's num_classes
    workers: int = -1  # DataLoader workers per rank (ImageFolder); -1: 0 on a CPU, up to 8 per process on CUDA
    pin_memory: bool = True  # pinned host batches on CUDA (asynchronous copies)


@dataclass
class SpaceOverride:
    """Change the space's input and classes (a derived space, named e.g. fmnist_3x32_5cls, saved as space.yaml in
    the run directory). `from_data`: take whatever the dataset gives (channels, size, classes) instead of an error."""

    num_classes: Optional[int] = None
    in_channels: Optional[int] = None
    input_size: Optional[int] = None
    from_data: bool = False


@dataclass
class HessianConfig:
    gamma: float = 0.0  # weight of the Hessian-trace quantization penalty (0: off)
    refresh_every: int = 200  # steps between trace refreshes (also refreshed at the end of warm-up)
    target_rel_se: float = 0.1
    max_probes: int = 64
    batches: int = 2


@dataclass
class ObjectiveConfig:
    kind: str = "multiplicative"  # multiplicative (FBNet) | additive | target | none
    alpha: float = 0.2
    beta: float = 0.6
    lam: float = 0.2
    limit_ms: Optional[float] = None  # kind=target: keep E[LAT] under this
    eta: float = 0.05  # dual-ascent step of the target multiplier
    ref_ms: Optional[float] = None  # latency reference; default: E[LAT] of the uniform supernet
    hessian: HessianConfig = field(default_factory=HessianConfig)


@dataclass
class OptimConfig:
    w_lr: float = 0.1
    w_momentum: float = 0.9
    w_weight_decay: float = 1e-4
    arch_lr: float = 0.01
    arch_weight_decay: float = 5e-4
    grad_clip: float = 5.0


@dataclass
class DeriveConfig:
    method: str = "argmax"  # argmax | sample
    k: int = 8  # sample: architectures drawn from softmax(theta), best by val loss and latency kept
    eval_batches: int = 4
    calibration_batches: int = 4  # training batches that re-estimate BN statistics of an evaluated path


@dataclass
class WandbConfig:
    project: str = "fbnas"
    mode: str = "offline"  # offline | online | disabled
    entity: Optional[str] = None


@dataclass
class SearchConfig:
    space: str = "fmnist"
    space_override: SpaceOverride = field(default_factory=SpaceOverride)
    device: Any = "sd835"  # the target device: a name in conf/device/, or its mapping (the Hydra group)
    device_file: Optional[str] = None  # a device YAML elsewhere (device=path.yaml sets this)
    lut: Optional[str] = None  # a latency-table path; default latency_tables/<space>__<device>.json
    mode: str = "soft"  # soft (FBNet, all paths) | hard (straight-through, one path)
    bit_sampling: str = "hard"  # soft (EdMIPS mixing of every bit option) | hard (one option, straight-through)
    quantized: bool = True
    epochs: int = 6
    warmup_epochs: int = 2
    max_steps_per_epoch: int = 0  # >0: cap the weight steps per epoch
    tau: float = 5.0
    tau_decay: float = 0.956  # per epoch (FBNet's schedule, made for ~90 epochs)
    # decay geometrically to tau_final at the last epoch (overrides tau_decay; null: FBNet's tau_decay per epoch,
    # which is made for ~90 epochs and leaves a short search at tau ~4, where the argmax never separates)
    tau_final: Optional[float] = 0.5
    seed: int = 0
    accelerator: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # bf16 autocast on CUDA
    channels_last: bool = False  # on CUDA (bench/supernet_step.py compares; depthwise bf16 NHWC is slow there)
    threads: int = 0  # CPU threads (0: torch default)
    dist_timeout_s: float = 300.0  # under torchrun: rendezvous and collective timeout (a lost rank ends the job)
    resume: bool = False
    logger: str = "none"  # none | wandb
    progress: bool = True
    report: bool = True  # the command line writes report.md and plots into the run directory (fbnas report)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    derive: DeriveConfig = field(default_factory=DeriveConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class TrainData:
    """The dataset a found architecture trains on (`fbnas train`, `fbnas pareto`)."""
    name: str = "fashion_mnist"
    root: Optional[str] = None
    train_subset: int = 0
    test_subset: int = 0


@dataclass
class ParetoConfig:
    """`fbnas pareto`: train searched networks and baselines with one recipe; accuracy vs device latency."""
    runs: list[str] = field(default_factory=list)  # search run dirs, multirun (sweep) dirs or arch.json files
    baselines: list[str] = field(default_factory=lambda: ["random:12", "handcrafted", "uniform_bits"])
    space: str = "fmnist"
    device: Any = "sd835"  # the device whose latency table prices every network (as in `fbnas search`)
    device_file: Optional[str] = None
    lut: Optional[str] = None
    budgets: list[float] = field(default_factory=list)  # latency budgets of random:N (empty: the runs' limit_ms)
    budget_unit: str = "ms"  # ms | mbv2 (fractions of the MobileNetV2-like W8A8 net's latency)
    budget_tolerance: float = 0.05  # random nets are within +-this fraction of their budget
    random_seed: int = 0
    random_max_tries: int = 200000  # random architectures drawn per budget before giving up
    seeds: list[int] = field(default_factory=lambda: [0, 1])  # training seeds of every network
    workers: int = 1  # parallel training processes (0: in this process)
    threads: int = 0  # torch threads per worker (0: CPU cores / workers)
    progress: bool = True
    train: TrainSettings = field(default_factory=TrainSettings)  # the one recipe (train.seed: use 'seeds')
    data: TrainData = field(default_factory=TrainData)
