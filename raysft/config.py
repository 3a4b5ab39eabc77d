"""Typed configuration schema: one dataclass per Hydra group, registered in Hydra's ConfigStore.

Every preset in ``conf/`` extends one of the ``base_*`` schema nodes through its defaults list, so a
misspelt key or a wrong type in a preset or on the command line fails before Ray starts.
Values that can be derived (gradient accumulation from the global batch, the step count from the
data) are derived, not exposed twice.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

# ----------------------------------------------------------------------------- model


@dataclass
class ModelConfig:
    name_or_path: str = MISSING
    """Hub id or local directory of the model. With ``init=random`` only its config.json is read."""
    revision: str = "main"
    init: str = "pretrained"
    """``pretrained`` loads weights; ``random`` builds a fresh model from the architecture config."""
    config_overrides: dict[str, Any] = field(default_factory=dict)
    """Architecture fields replaced before a random init (how the tiny test model is scaled down)."""
    tokenizer: Optional[str] = None
    """Tokenizer location; defaults to ``name_or_path``. ``bundled:smollm3`` is the copy shipped in raysft."""
    dtype: str = "float32"
    """``float32`` | ``bfloat16`` | ``float16`` | ``auto``."""
    attn_implementation: str = "sdpa"
    """``flash_attention_2`` on GPUs (the recipes); falls back to ``sdpa`` without CUDA, with a log line."""
    trust_remote_code: bool = False
    use_liger_kernel: bool = False
    """Apply liger-kernel's Triton kernels (GPU only; skipped with a log line on CPU)."""

    def validate(self) -> None:
        _check_choice("model.init", self.init, ("pretrained", "random"))
        _check_choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16", "auto"))


# ----------------------------------------------------------------------------- data


@dataclass
class SourceConfig:
    """One entry of an alignment-handbook ``dataset_mixture.datasets`` list (same keys)."""

    id: Optional[str] = None
    """Hub dataset id, e.g. ``HuggingFaceTB/smoltalk2`` (read from ``data.root`` when that is set)."""
    path: Optional[str] = None
    """Local file, directory, hub-layout mirror or ``save_to_disk`` folder, instead of ``id``."""
    config: Optional[str] = None
    split: str = "train"
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) of ``id``; None = main."""
    columns: Optional[list[str]] = None
    weight: Optional[float] = 1.0
    """Fraction of the source's rows kept after a seeded shuffle (handbook semantics; null = 1.0).
    ``weight > 1`` repeats the source ``ceil(weight)`` times, then keeps that fraction."""
    name: Optional[str] = None
    """Label used in stats and per-source losses; defaults to the split name."""

    def validate(self) -> None:
        if (self.id is None) == (self.path is None):
            raise ValueError(f"data source {self.label!r}: set exactly one of `id` (hub dataset) or `path` (local)")
        if self.weight is None:  # handbook mixtures may leave the weight out: keep every row
            self.weight = 1.0
        if not self.weight > 0:
            raise ValueError(f"data source {self.label!r}: weight must be > 0, got {self.weight}")

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.split != "train":
            return self.split
        return (self.id or self.path or "?").rstrip("/").rsplit("/", 1)[-1]


@dataclass
class MixtureConfig:
    datasets: list[SourceConfig] = field(default_factory=list)
    seed: int = 42
    test_split_size: float = 0.0
    """Fraction of the mixed rows held out for evaluation (``train_test_split(test_size, seed)``)."""

    def validate(self) -> None:
        if not self.datasets:
            raise ValueError("data.dataset_mixture.datasets is empty: list at least one source")
        if not 0.0 <= self.test_split_size < 1.0:
            raise ValueError(f"data.dataset_mixture.test_split_size must be in [0, 1), got {self.test_split_size}")


@dataclass
class DataConfig:
    dataset_mixture: MixtureConfig = field(default_factory=MixtureConfig)
    root: Optional[str] = None
    """Local mirror of hub datasets in hub layout (``<config>/<split>-*.parquet``); ``bundled:`` paths
    resolve inside raysft's assets."""
    format: str = "auto"
    """``auto`` | ``messages`` | ``prompt_completion`` | ``text``."""
    column_map: str = "default"
    """``default`` (smoltalk2 / TRL names) or ``sharegpt`` (conversations / from / value)."""
    chat_template: Optional[str] = None
    """None = the tokenizer's template; ``mid`` / ``sft`` = the SmolLM3 recipe templates; or a .jinja path."""
    eos_token: Optional[str] = "<|im_end|>"
    loss: str = "assistant_only"
    """``assistant_only`` (TRL assistant_only_loss), ``completion_only`` (prompt-completion) or ``all``."""
    max_length: int = 1024
    """Tokens per packed row (TRL ``max_length``)."""
    packing: bool = True
    packing_strategy: str = "bfd"
    """``bfd`` (best-fit decreasing; ``ffd`` accepted as its old name), ``wrapped`` or ``none``."""
    overlong: str = "truncate"
    """What happens to a sequence longer than ``max_length``: ``truncate`` or ``drop`` (counted either way)."""
    window_rows: int = 4096
    """Rows packed together in one bounded BFD window (memory stays flat whatever the dataset size)."""
    order: str = "handbook"
    """``handbook``: the exact row order of the handbook's global shuffle (random reads; for data
    that is cheap to read randomly). ``streaming``: the same rows, read file chunk by file chunk,
    chunks interleaved by a seeded shuffle (sequential reads; for 100 GB mixtures)."""
    max_bad_fraction: float = 0.01
    """Abort when more than this fraction of a source's selected rows is malformed."""
    date: Optional[str] = None
    """Date the chat template prints (``strftime_now``), ISO format. None = the run's start date, recorded."""

    def validate(self) -> None:
        _check_choice("data.format", self.format, ("auto", "messages", "prompt_completion", "text"))
        _check_choice("data.column_map", self.column_map, ("default", "sharegpt"))
        _check_choice("data.loss", self.loss, ("assistant_only", "completion_only", "all"))
        _check_choice("data.packing_strategy", self.packing_strategy, ("bfd", "ffd", "bfd_split", "wrapped", "none"))
        _check_choice("data.overlong", self.overlong, ("truncate", "drop"))
        _check_choice("data.order", self.order, ("handbook", "streaming"))
        if self.max_length <= 0:
            raise ValueError(f"data.max_length must be > 0, got {self.max_length}")
        if self.window_rows <= 0:
            raise ValueError(f"data.window_rows must be > 0, got {self.window_rows}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")


# ----------------------------------------------------------------------------- trainer


@dataclass
class TrainerConfig:
    """A curated subset of TRL ``SFTConfig`` (same names). Anything else: ``trainer.trl_overrides``."""

    num_train_epochs: float = 1.0
    max_steps: int = -1
    """-1 = derived from the packed row count, epochs and the global batch (printed at start)."""
    learning_rate: float = 3.0e-5
    lr_scheduler_type: str = "cosine_with_min_lr"
    lr_scheduler_kwargs: dict[str, Any] = field(default_factory=lambda: {"min_lr_rate": 0.1})
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 0.2
    per_device_train_batch_size: int = 1
    """Packed rows per worker per micro-step."""
    gradient_accumulation_steps: int = 2
    gradient_checkpointing: bool = False
    use_reentrant: bool = True
    bf16: bool = False
    """Mixed precision on GPUs (the recipes); forced off on CPU, with a log line."""
    average_tokens_across_devices: bool = True
    logging_steps: int = 1
    eval_steps: Optional[int] = None
    """Evaluate on the held-out split every N steps (None: at the end only, when there is an eval split)."""
    save_strategy: str = "steps"
    save_steps: float = 0.05
    """Steps between checkpoints, or a fraction of the run when < 1 (as in the recipes)."""
    save_total_limit: int = 1
    """Checkpoints kept in storage: the newest ones, or the best ones with ``metric_for_best_model``
    (Ray Train always keeps the latest too, so a run can resume)."""
    metric_for_best_model: Optional[str] = None
    """e.g. ``eval_loss``: keep the ``save_total_limit`` best checkpoints by this metric."""
    greater_is_better: bool = False
    seed: int = 42
    report_to: list[str] = field(default_factory=lambda: ["none"])
    """Trackers: any of ``trackio``, ``wandb``, ``tensorboard``; ``none`` for none."""
    trl_overrides: dict[str, Any] = field(default_factory=dict)
    """Passed to ``SFTConfig`` as is, for fields not curated above."""

    def validate(self) -> None:
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"trainer.{name} must be > 0, got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"trainer.max_steps must be -1 (derive) or > 0, got {self.max_steps}")
        _check_choice("trainer.save_strategy", self.save_strategy, ("steps", "epoch", "no"))
        if self.save_total_limit <= 0:
            raise ValueError(f"trainer.save_total_limit must be > 0, got {self.save_total_limit}")
        if self.metric_for_best_model and not self.metric_for_best_model.startswith("eval_"):
            raise ValueError(f"trainer.metric_for_best_model={self.metric_for_best_model!r}: checkpoints are scored "
                             "by an eval metric (eval_loss, eval_mean_token_accuracy, ...)")


# ----------------------------------------------------------------------------- infrastructure


@dataclass
class ScalingConfig:
    """Maps to ``ray.train.ScalingConfig`` (same names)."""

    num_workers: int = 2
    """Training workers (one per GPU). With ``min_workers`` set, the most an elastic run uses."""
    min_workers: Optional[int] = None
    """Elastic training: Ray Train runs with any number of workers in [min_workers, num_workers]
    and resizes the group (restarting from the latest checkpoint) as nodes come and go. The global
    batch stays num_workers x batch x accumulation: accumulation is re-derived for the live group.
    DDP only (ZeRO-3 shards are per rank)."""
    elastic_resize_interval_s: float = 60.0
    """Elastic runs: how often Ray Train checks whether more workers fit (then it restarts the group,
    bigger, from the latest checkpoint)."""
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    accelerator_type: Optional[str] = None
    """e.g. ``H100``: Ray only places workers on nodes of that type (the autoscaler starts them)."""
    memory_per_worker_gb: Optional[float] = None
    placement_strategy: str = "PACK"
    address: Optional[str] = None
    """Ray cluster address; None = ``RAY_ADDRESS`` if set, else an in-process local Ray."""
    local_num_cpus: Optional[int] = None
    """Logical CPUs of the in-process local Ray. None = workers' CPUs + 2 so Ray Data never starves
    (Ray schedules by logical CPUs: with exactly 2 on a 2-core box two workers leave data 0 CPU)."""
    data_cpus_per_task: float = 0.5
    """CPUs reserved by each data preparation task (fractional, so it can share a core with workers)."""
    data_concurrency: int = 1
    """Data preparation actors per dataset (more on clusters with CPU nodes). The output is the same."""
    max_failures: int = 0
    """Ray Train restarts the worker group this many times after a failure, resuming from the
    latest checkpoint (``ray.train.FailureConfig``); -1 = forever."""
    data_timeout_s: float = 1800.0
    """A worker waiting this long for its next batch fails the run with a message instead of hanging."""

    def validate(self) -> None:
        if self.num_workers <= 0:
            raise ValueError(f"scaling.num_workers must be > 0, got {self.num_workers}")
        if self.min_workers is not None and not 0 < self.min_workers <= self.num_workers:
            raise ValueError(f"scaling.min_workers must be in [1, num_workers={self.num_workers}], got {self.min_workers}")
        _check_choice("scaling.placement_strategy", self.placement_strategy, ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))


@dataclass
class StorageConfig:
    path: str = "runs"
    """Where runs go: a local directory (relative to the launch directory) or ``s3://bucket/prefix``.
    Endpoint, region and credentials come from the environment (AWS_*), never from the config."""
    name: Optional[str] = None
    """Run name; None = ``<model>-<data>-<timestamp>``. Re-using a name resumes that run."""


@dataclass
class DeepSpeedConfig:
    enabled: bool = False
    stage: int = 3
    zero3_init: bool = True
    save_16bit_model: bool = True
    offload_optimizer: bool = False
    offload_param: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    """Merged into the generated DeepSpeed JSON config."""

    def validate(self) -> None:
        _check_choice("deepspeed.stage", self.stage, (0, 1, 2, 3))


@dataclass
class PeftConfig:
    enabled: bool = False
    method: str = "lora"
    """``lora`` or ``qlora`` (4-bit base weights through bitsandbytes; GPUs)."""
    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: Any = "all-linear"
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_use_double_quant: bool = True

    def validate(self) -> None:
        _check_choice("peft.method", self.method, ("lora", "qlora"))


@dataclass
class MonitorConfig:
    sample_prompts: list[str] = field(default_factory=list)
    """Fixed prompts generated from (greedy) every ``sample_every_steps`` steps."""
    sample_every_steps: int = 0
    """0 = only at the end of training."""
    sample_max_new_tokens: int = 32
    log_batch_hashes: bool = False
    """Write ``workers/batches_rank<r>.jsonl``: a hash of every micro-batch each worker trained on,
    by its index in the run (an audit trail: two runs, or a run and its resume, can be compared)."""
    peak_tflops_per_gpu: float = 989.0
    """Peak dense bf16 TFLOP/s of one GPU for the MFU estimate (H100 SXM: 989); logged on GPUs only."""


@dataclass
class PlanConfig:
    """Knobs of ``raysft plan`` (run size, memory, time and cost, computed before anything trains).
    Training ignores them."""

    tokens_per_s_per_gpu: Optional[float] = None
    """Training throughput per GPU (or per CPU worker) for the wall-time estimate, in processed tokens
    (padding included). None = derived on GPUs: the MFU of SmolLM3's published pretraining run
    (11.2T tokens on 384 H100s in 24 days = 14.1k tokens/s/GPU for 3.08B params, i.e. 26% of the
    H100's 989 dense bf16 TFLOP/s counting 6 FLOPs/param/token) held constant for this model's FLOPs
    per token (attention and gradient-checkpointing recompute included) and this GPU's peak.
    See ``raysft/launch/estimates.py``. Set your measured figure (runs log tokens/s) to sharpen it."""
    usd_per_gpu_hour: Optional[float] = None
    """Price of one GPU-hour for the cost estimate. None = a rough on-demand list price for
    ``scaling.accelerator_type`` (table in ``raysft/launch/estimates.py``)."""
    global_batch_rows: Optional[int] = None
    """Packed rows per optimizer step the config must reproduce (workers x per-device batch x
    accumulation); ``raysft plan`` refuses a config that does not (the SmolLM3 recipes: 128).
    None = not checked."""

    def validate(self) -> None:
        if self.tokens_per_s_per_gpu is not None and not self.tokens_per_s_per_gpu > 0:
            raise ValueError(f"plan.tokens_per_s_per_gpu must be > 0, got {self.tokens_per_s_per_gpu}")
        if self.usd_per_gpu_hour is not None and self.usd_per_gpu_hour < 0:
            raise ValueError(f"plan.usd_per_gpu_hour must be >= 0, got {self.usd_per_gpu_hour}")
        if self.global_batch_rows is not None and self.global_batch_rows <= 0:
            raise ValueError(f"plan.global_batch_rows must be > 0, got {self.global_batch_rows}")


# ----------------------------------------------------------------------------- sweep

DISTRIBUTIONS = ("loguniform", "uniform", "choice", "grid", "randint")


@dataclass
class DistributionConfig:
    """How one config key is sampled in a sweep (Ray Tune search space)."""

    type: str = MISSING
    """``loguniform`` / ``uniform`` (``low``, ``high``), ``randint`` (``low`` <= x < ``high``),
    ``choice`` (random pick from ``values``) or ``grid`` (every one of ``values``, x ``num_samples``)."""
    low: Optional[float] = None
    high: Optional[float] = None
    values: Optional[list[Any]] = None

    def check(self, key: str) -> None:
        _check_choice(f"sweep.space[{key}].type", self.type, DISTRIBUTIONS)
        if self.type in ("choice", "grid"):
            if not self.values:
                raise ValueError(f"sweep.space[{key}]: type {self.type} needs a non-empty `values` list")
            return
        if self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"sweep.space[{key}]: type {self.type} needs `low` < `high`, got {self.low}, {self.high}")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError(f"sweep.space[{key}]: loguniform needs `low` > 0, got {self.low}")


@dataclass
class SchedulerConfig:
    type: str = "asha"
    """``asha`` (early-stop trials that trail the others at each rung) or ``fifo`` (run every trial to the end)."""
    time_attr: str = "training_iteration"
    """What ASHA counts: ``training_iteration`` = reports of the metric (one per logging step for
    ``loss``, one per evaluation for ``eval_loss``), or ``global_step``."""
    grace_period: int = 2
    """A trial runs at least this many ``time_attr`` units before it can be stopped."""
    reduction_factor: float = 2.0
    """At each rung only the best 1/reduction_factor of the trials continue."""
    max_t: int = 100_000
    """No trial runs past this many ``time_attr`` units (high by default: a trial ends at its own max_steps)."""

    def validate(self) -> None:
        _check_choice("sweep.scheduler.type", self.type, ("asha", "fifo"))
        _check_choice("sweep.scheduler.time_attr", self.time_attr, ("training_iteration", "global_step"))
        if self.grace_period < 1 or self.max_t < self.grace_period:
            raise ValueError(f"sweep.scheduler needs 1 <= grace_period <= max_t, got {self.grace_period}, {self.max_t}")
        if not self.reduction_factor > 1:
            raise ValueError(f"sweep.scheduler.reduction_factor must be > 1, got {self.reduction_factor}")


@dataclass
class SweepConfig:
    """A Ray Tune sweep over any config keys (``raysft sweep=lr``); each trial is a full raysft run."""

    name: str = MISSING
    """The sweep's directory under ``storage.path``; trials run as ``<name>-trial-<id>``. Re-running
    with an existing name resumes that sweep (finished trials are not run again)."""
    space: dict[str, DistributionConfig] = field(default_factory=dict)
    """Config key (dotted, list indices allowed: ``data.dataset_mixture.datasets.0.weight``; or a
    group: ``peft``) -> distribution."""
    metric: str = "eval_loss"
    """Any numeric metric the run logs (``loss``, ``eval_loss``, ``eval_loss/<source>``, ...)."""
    mode: str = "min"
    num_samples: int = 1
    """Trials drawn from the space (with ``grid`` entries: repeats of the whole grid)."""
    max_concurrent_trials: int = 1
    """Trials at once; each takes its ``scaling`` workers (1 on one machine, more on a cluster)."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    search_alg: str = "random"
    """``random`` (Tune's random / grid variants) or ``optuna`` (TPE; ``pip install 'raysft[sweep]'``)."""
    seed: Optional[int] = None
    """Seed of the random search (None: a different draw each sweep)."""
    trial_cpus: float = 0.1
    """CPUs reserved for each trial's driver (data stats pass, TorchTrainer); the workers come on top."""

    def validate(self) -> None:
        if not self.space:
            raise ValueError("sweep.space is empty: map at least one config key to a distribution")
        for key, dist in self.space.items():
            dist.check(key)
        _check_choice("sweep.mode", self.mode, ("min", "max"))
        _check_choice("sweep.search_alg", self.search_alg, ("random", "optuna"))
        for name in ("num_samples", "max_concurrent_trials"):
            if getattr(self, name) < 1:
                raise ValueError(f"sweep.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.trial_cpus:
            raise ValueError(f"sweep.trial_cpus must be > 0 (Tune cannot place a zero-resource trial), got {self.trial_cpus}")
        if self.search_alg == "optuna":
            import importlib.util

            if importlib.util.find_spec("optuna") is None:
                raise ValueError("sweep.search_alg=optuna needs optuna: pip install 'raysft[sweep]' (or use sweep.search_alg=random)")
            grids = [k for k, d in self.space.items() if d.type == "grid"]
            if grids:
                raise ValueError(f"sweep.search_alg=optuna cannot take grid entries ({', '.join(grids)}): use type choice")


@dataclass
class RaySFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    resume: Optional[str] = None
    """``latest``: continue the run named ``storage.name`` (or, without a name, the run under
    ``storage.path`` with the newest checkpoint). A URI (a run folder or one of its ``checkpoint_*``
    folders, local or s3://): start this run from that checkpoint (weights, optimizer, schedule,
    step and data position). None: a new run, unless ``storage.name`` names one with checkpoints."""
    stage: str = "custom"
    """Name of the stage preset that set the trainer fields (for run names and model cards)."""
    sweep: Optional[SweepConfig] = None
    """A Ray Tune sweep (``raysft sweep=lr``): when set, ``raysft`` runs the sweep instead of one run."""

    def validate(self) -> None:
        if self.scaling.min_workers is not None and self.deepspeed.enabled:
            raise ValueError("scaling.min_workers (elastic training) needs deepspeed=none: DeepSpeed ZeRO checkpoints "
                             "are sharded per rank and cannot be resumed by a group of another size")


# ----------------------------------------------------------------------------- helpers


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {list(choices)}")


GROUP_SCHEMAS = {
    "model": ModelConfig,
    "data": DataConfig,
    "trainer": TrainerConfig,
    "scaling": ScalingConfig,
    "storage": StorageConfig,
    "deepspeed": DeepSpeedConfig,
    "peft": PeftConfig,
    "monitor": MonitorConfig,
    "plan": PlanConfig,
    "sweep": SweepConfig,
}


def register_configs() -> None:
    """Register the schema nodes that ``conf/**.yaml`` presets extend (``defaults: [base_<group>]``)."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=RaySFTConfig)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group=group, name=f"base_{group}", node=schema)


def to_typed(cfg: DictConfig | dict) -> RaySFTConfig:
    """Instantiate the dataclasses from a composed config and run every ``validate()`` check.

    NOTE: checks live in ``validate()``, not ``__post_init__``: OmegaConf builds the schema's own
    defaults (an empty mixture, a MISSING model) through the constructors, which must not fail.
    """
    if isinstance(cfg, dict):
        cfg = OmegaConf.merge(OmegaConf.structured(RaySFTConfig), cfg)
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, RaySFTConfig)
    _validate_tree(obj)
    return obj


def _validate_tree(node: Any) -> None:
    if dataclasses.is_dataclass(node):
        if hasattr(node, "validate"):
            node.validate()
        for f in dataclasses.fields(node):
            _validate_tree(getattr(node, f.name))
    elif isinstance(node, list):
        for item in node:
            _validate_tree(item)


def to_plain(cfg: RaySFTConfig) -> dict[str, Any]:
    """A plain dict (no OmegaConf objects) for Ray's ``train_loop_config`` and for saving."""
    return dataclasses.asdict(cfg)


def from_plain(d: dict[str, Any]) -> RaySFTConfig:
    return to_typed(OmegaConf.merge(OmegaConf.structured(RaySFTConfig), d))


def valid_keys(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]
