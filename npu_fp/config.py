"""Typed job configuration, registered with Hydra's ConfigStore.

YAML files under `conf/` only hold presets; the schema and its checks live here. The entry point
converts the composed DictConfig once (`OmegaConf.to_object`, which runs `__post_init__`), and every
function below it takes these frozen dataclasses, so tests build them directly without Hydra.
Choices are Enums: Hydra refuses a value outside them when it composes the config, and
`__post_init__` converts (and so checks) plain strings given by tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf


class Choice(str, Enum):
    """A config choice that compares, hashes, prints and serialises as its plain string."""

    def __str__(self) -> str:
        return str(self.value)


class Command(Choice):
    demo = "demo"
    fingerprint = "fingerprint"
    compare = "compare"
    activations = "activations"
    benchmark = "benchmark"


class DeviceChoice(Choice):
    auto = "auto"  # cuda, then npu, then cpu
    cpu = "cpu"
    cuda = "cuda"
    npu = "npu"


class ActivationsMode(Choice):
    data = "data"  # batches split over ranks
    pipeline = "pipeline"  # layers split over ranks


class ActivationsDtype(Choice):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


COMMANDS = tuple(c.value for c in Command)


def _choice(owner: object, name: str, kind: type[Choice], key: str) -> None:
    """Convert a field of a frozen dataclass to its Enum, naming the key and the choices."""
    value = getattr(owner, name)
    try:
        object.__setattr__(owner, name, kind(value))
    except ValueError:
        choices = ", ".join(c.value for c in kind)
        raise ValueError(f"{key} must be one of {choices}, got {value!r}") from None


@dataclass(frozen=True)
class ModelConfig:
    path: str | None = None  # folder, sharded folder or HF cache folder; None: the demo zoo
    name: str | None = None  # display name; defaults to the folder's basename
    lm_prefix: str | None = None  # multimodal checkpoints: only tensors under this prefix are LM
    # What the preset expects; checked against config.json when set (catches a wrong path early)
    expect_arch: str | None = None
    expect_layers: int | None = None


@dataclass(frozen=True)
class PlanConfig:
    expert_groups: bool = False  # keep every expert of a MoE group (or of an expert) on one rank
    # Big tensors are cut into row segments of at most this many bytes. The grid depends on the
    # tensor only (never on the number of ranks), which keeps results bit-identical across ranks
    # and content hashes comparable across models.
    segment_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        if self.segment_bytes < 4096:
            raise ValueError(f"plan.segment_bytes must be >= 4096, got {self.segment_bytes}")


@dataclass(frozen=True)
class StatsConfig:
    # elements widened to float64 per kernel step; None: the selected device's default (npu_fp.device:
    # L2-sized on the CPU, large on an accelerator so one transfer feeds many kernels)
    chunk_elems: int | None = None
    read_bytes: int | None = None  # host read window per rank; None: the selected device's default

    def __post_init__(self) -> None:
        if self.chunk_elems is not None and self.chunk_elems <= 0:
            raise ValueError(f"stats.chunk_elems must be > 0, got {self.chunk_elems}")
        if self.read_bytes is not None and self.read_bytes < 4096:
            raise ValueError(f"stats.read_bytes must be >= 4096, got {self.read_bytes}")


@dataclass(frozen=True)
class ActivationsConfig:
    enabled: bool = False
    corpus: str | None = None  # text / jsonl file or folder; None: the embedded corpus
    batch_size: int = 2
    seq_len: int = 128
    num_batches: int = 4
    seed: int = 0
    mode: ActivationsMode = ActivationsMode.data
    dtype: ActivationsDtype = ActivationsDtype.float32  # weights on the device
    layers_per_block: int = 1
    # batches whose hidden states a rank holds at once; the weights are streamed once per pass, so
    # larger passes read the checkpoint fewer times at the cost of pass x batch x seq x hidden
    # activations on the device
    pass_batches: int = 16
    # mode=pipeline: a rank whose stage of layers (in the compute dtype) fits this many bytes keeps
    # it on its device for the whole run, so it reads its slice of the checkpoint once, not once
    # per pass; else it streams as data mode does. None: half the free memory of the selected
    # device (host RAM available on the CPU, divided among the ranks of the host); 0: always stream
    resident_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "num_batches", "layers_per_block", "pass_batches"):
            if getattr(self, name) <= 0:
                raise ValueError(f"activations.{name} must be > 0, got {getattr(self, name)}")
        if self.resident_bytes is not None and self.resident_bytes < 0:
            raise ValueError(
                f"activations.resident_bytes must be >= 0 or null, got {self.resident_bytes}"
            )
        _choice(self, "mode", ActivationsMode, "activations.mode")
        _choice(self, "dtype", ActivationsDtype, "activations.dtype")


@dataclass(frozen=True)
class CompareConfig:
    models: list[str] = field(default_factory=list)  # model folders (fingerprinted, cached)
    signatures: list[str] = field(default_factory=list)  # saved signature files
    p_threshold: float = 1e-6  # a pair is `related` when the combined weight-level p is below this
    # p between p_threshold and weak_p is weak evidence: `inconclusive`, never `independent`
    weak_p: float = 1e-3
    bank: str | None = None  # folder of signatures of known-independent models (profile nulls)
    cache_dir: str | None = None  # where signatures of fingerprinted models are cached
    names: list[str] = field(default_factory=list)  # display names: models first, then signatures
    max_tokens: int = 8192  # shared-vocabulary tokens sampled for the residual alignment
    lap_max_units: int = 2048  # exact LAP up to this many units per side, row argmax above
    proj_dim: int = 256  # unit matching projects the residual axis to this many dims when wider
    sketch_dim: int = 32  # columns of the layer sketches behind the layer x layer matrix
    max_pool_units: int = 65536  # skip unit matching into a larger FFN unit pool (with a warning)
    seed: int = 0  # token subsample and projections
    # a signature whose model folder now holds other bytes (io/stamp.py): fingerprint the folder
    # again (true) or stop with a named error (false)
    refingerprint_stale: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.p_threshold < 1.0:
            raise ValueError(f"compare.p_threshold must be in (0, 1), got {self.p_threshold}")
        if not self.p_threshold <= self.weak_p < 1.0:
            raise ValueError(
                f"compare.weak_p must be in [p_threshold, 1), got {self.weak_p} "
                f"(p_threshold {self.p_threshold})"
            )
        for name in ("max_tokens", "lap_max_units", "proj_dim", "sketch_dim", "max_pool_units"):
            if getattr(self, name) < 8:
                raise ValueError(f"compare.{name} must be >= 8, got {getattr(self, name)}")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"compare.names must be unique, got {self.names}")


@dataclass(frozen=True)
class BenchmarkConfig:
    pairs: str | None = None  # manifest of models and labelled pairs (npu_fp/lineage_bench.py)
    models_dir: str | None = None  # HF cache folder where `hf` ids of the manifest are looked up


@dataclass(frozen=True)
class DistConfig:
    # longest a rank waits for another at a synchronisation point (the process-group timeout):
    # a stopped or hung rank is named after this long. It must exceed the spread of finishing
    # times between ranks (the plan balances bytes); a false alarm costs little, as finished work
    # items are kept and a rerun resumes from them.
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"dist.timeout_s must be > 0, got {self.timeout_s}")


@dataclass(frozen=True)
class RunConfig:
    command: Command = Command.demo  # `npu-fp` alone: fingerprint and compare the demo zoo
    model: ModelConfig = field(default_factory=ModelConfig)
    device: DeviceChoice = DeviceChoice.auto
    # Hydra's run directory (`hydra.run.dir`), resolved when the composed config is converted;
    # code that builds a RunConfig without Hydra passes its own
    out_dir: str = "${hydra:runtime.output_dir}"
    zoo_dir: str | None = None  # where the demo zoo is built; None: ~/.cache/npu_fp/zoo
    dry_run: bool = False
    world_size: int | None = None  # dry_run only: plan for this many ranks without launching
    progress: bool = True
    plan: PlanConfig = field(default_factory=PlanConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    activations: ActivationsConfig = field(default_factory=ActivationsConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def __post_init__(self) -> None:
        _choice(self, "command", Command, "command")
        _choice(self, "device", DeviceChoice, "device")
        if "${" in self.out_dir:
            raise ValueError(f"out_dir={self.out_dir!r}: give an output folder (outside Hydra)")
        if self.world_size is not None and self.world_size <= 0:
            raise ValueError(f"world_size must be > 0, got {self.world_size}")


def _writable(node: DictConfig) -> DictConfig:
    """OmegaConf marks the nodes of frozen dataclasses read-only, which would refuse every Hydra
    override; the dataclasses made by `to_run_config` stay frozen."""
    OmegaConf.set_readonly(node, None)
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            _writable(child)
    return node


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=_writable(OmegaConf.structured(RunConfig)))
    cs.store(group="model", name="model_schema", node=_writable(OmegaConf.structured(ModelConfig)))
    cs.store(
        group="activations",
        name="activations_schema",
        node=_writable(OmegaConf.structured(ActivationsConfig)),
    )


def schema_keys(node: Any = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (`plan.segment_bytes`, ...), for help and typo hints."""
    out = []
    for f in fields(node):
        key = f"{prefix}{f.name}"
        kind = f.default_factory if is_dataclass(f.default_factory) else None  # type: ignore[misc]
        if kind is not None:
            out += schema_keys(kind, key + ".")
        else:
            out.append(key)
    return out


def to_run_config(cfg: Any) -> RunConfig:
    """The one DictConfig -> dataclass conversion, done at the entry point."""
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, RunConfig), type(obj)
    return obj
