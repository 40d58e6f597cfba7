"""The scenario schema: one place that defines, defaults and validates every key.

A scenario is a TOML file with one table per section (``[run]``, ``[data]``,
``[shift]``, ``[model]``, ``[train]``). Every key is declared exactly once, in the
dataclasses below, with its type, default, allowed range and a one-line help.
:func:`load_scenario` is the only entry point; any problem raises
:class:`ScenarioError` whose message names the file, the key and the problem.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from fedtiny.bridge.address import address_problem
from fedtiny.compress.uplink import uplink_names
from fedtiny.compress.values import value_type_names
from fedtiny.devices import PROFILES, RADIOS
from fedtiny.errors import ScenarioError
from fedtiny.int8.optimizers import optimizer_kind, optimizer_names
from fedtiny.rules import rule_named, rule_names
from fedtiny.variants import ATTACK_METHODS, DATA_SOURCES

__all__ = ["ScenarioError", "Scenario", "load_scenario", "parse_overrides", "schema_rows"]


def _key(default: Any, help: str, check: Callable[[Any], str | None] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "check": check})


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if lo is not None and (v <= lo if lo_open else v < lo):
            return f"must be {'>' if lo_open else '>='} {lo}, got {v}"
        if hi is not None and v > hi:
            return f"must be <= {hi}, got {v}"
        return None

    return check


def _choice(*options: str) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in options else f"must be one of {', '.join(options)}; got {v!r}"

    return check


def _each(check: Callable[[Any], str | None], *, nonempty: bool = False) -> Callable[[Any], str | None]:
    """Apply ``check`` to every item of a list-valued key."""

    def each(values: tuple) -> str | None:
        if nonempty and not values:
            return "must not be empty"
        for v in values:
            problem = check(v)
            if problem:
                return f"item {v!r}: {problem}"
        return None

    return each


@dataclass(frozen=True)
class RunSection:
    name: str = _key("fedtiny", "name of the run (used in the run folder name)")
    seed: int = _key(0, "seed for data split, partitioning, sampling and training", _range(0))
    rounds: int = _key(10, "number of federated rounds", _range(1, 100_000))
    clients: int = _key(10, "number of simulated clients (partitions)", _range(1, 100_000))
    clients_per_round: int = _key(0, "clients sampled per round; 0 means all", _range(0, 100_000))
    num_cpus: int = _key(2, "CPU cores given to the simulation backend", _range(1, 256))
    seeds: tuple[int, ...] = _key(
        (),
        "repeat the run (each method of a sweep) with these seeds; the sweep reports "
        "mean and spread; empty: run.seed only",
        _each(_range(0)),
    )
    cohort_size: int = _key(
        1,
        "simulation: virtual clients per ClientApp call (each with its own data, state, "
        "memory check and bytes; their states kept on disk in the run folder); 1: one client "
        "per node, the deployment's shape",
        _range(1, 100_000),
    )
    ray_address: str = _key(
        "",
        "simulation: address of an existing Ray cluster (HOST:PORT of `ray start --head`); "
        "empty: start Ray on this machine with run.num_cpus",
    )


@dataclass(frozen=True)
class DataSection:
    source: str = _key(
        "digits",
        "digits (bundled), lfw-faces (bundled face/no-face patches), photos (bundled colour 32x32 patches of two "
        "photos), mnist, fashion-mnist, cifar10 (local root), imagefolder, synthetic (a seeded load generator for "
        "any number of clients; not a benchmark)",
        lambda v: _choice(*DATA_SOURCES.names())(v),
    )
    root: str = _key("", "dataset root for torchvision sources (never downloaded)")
    image_size: int = _key(0, "resize images to this side length; 0 keeps the source's", _range(0, 512))
    image_width: int = _key(
        0,
        "with data.image_size: resize to image_size (height) x image_width (e.g. 49 x 10, "
        "the MFCC frames of a keyword spotter); 0: square",
        _range(0, 512),
    )
    channels: int = _key(
        0,
        "image channels: 3 turns grayscale into RGB, 1 RGB into grayscale; 0 keeps the source's",
        lambda v: None if v in (0, 1, 3) else f"must be 0, 1 or 3, got {v}",
    )
    max_samples: int = _key(0, "use at most this many samples (seeded subset); 0 means all", _range(0))
    partition: str = _key(
        "iid",
        "iid, dirichlet (label skew) or pathological (k classes each)",
        _choice("iid", "dirichlet", "pathological"),
    )
    alpha: float = _key(0.5, "Dirichlet concentration (smaller = more skewed)", _range(0.0, lo_open=True))
    classes_per_client: int = _key(2, "classes per client for the pathological partition", _range(1))
    min_partition_size: int = _key(2, "Dirichlet: resample until every client has this many samples", _range(0))
    public_fraction: float = _key(0.3, "share kept by the server for cloud pretraining", _range(0.0, 0.9))
    test_fraction: float = _key(0.2, "share kept by the server as the global test set", _range(0.0, 0.9, lo_open=True))
    client_test_fraction: float = _key(0.2, "share of each client's data held out for its local test", _range(0.0, 0.9))
    samples_per_client: int = _key(
        24, "synthetic: images each client holds (drawn when the client first needs them)", _range(1, 1_000_000)
    )
    server_samples: int = _key(
        1000, "synthetic: images in each of the server's public and test splits", _range(10, 10_000_000)
    )
    num_classes: int = _key(10, "synthetic: classes", _range(2, 1000))


@dataclass(frozen=True)
class ShiftSection:
    rotation_deg: float = _key(0.0, "fleet-wide sensor rotation (degrees) of the deployment domain", _range(-180, 180))
    gain: float = _key(1.0, "fleet-wide sensor gain", _range(0.0, 10.0, lo_open=True))
    offset: float = _key(0.0, "fleet-wide sensor offset (added to pixels in [0,1])", _range(-1.0, 1.0))
    noise_std: float = _key(0.0, "fleet-wide sensor noise standard deviation", _range(0.0, 1.0))
    client_rotation_deg: float = _key(0.0, "per-client rotation drawn uniformly in +-this", _range(0.0, 180.0))
    client_gain: float = _key(0.0, "per-client gain factor drawn uniformly in 1 +- this", _range(0.0, 0.99))
    client_noise_std: float = _key(0.0, "per-client extra noise std drawn uniformly in [0, this]", _range(0.0, 1.0))


@dataclass(frozen=True)
class ModelSection:
    name: str = _key("tiny-ir", "built-in model (used when model.file and model.module are empty)", _choice("tiny-ir"))
    file: str = _key(
        "",
        "an int8 model file clients train instead: a .tflite (TFLite Micro's int8 ops), a "
        "tiny-training .pkl or a fedtiny .safetensors (relative to the scenario file); its "
        "classifier is replaced for the data's classes (see model.head)",
    )
    head: str = _key(
        "new",
        "model.file: new = a new classifier for the data's classes, fitted in the cloud step; "
        "keep = the file's classifier as it is (the file is the cloud model: no cloud step; "
        "`fedtiny zoo cloud` writes one)",
        _choice("new", "keep"),
    )
    module: str = _key(
        "",
        'your own float PyTorch model instead of model.name: "package.module:function" or '
        '"path/to/file.py:function" (relative to the scenario file) returning a torch.nn.Module '
        "(called with those of in_channels, num_classes, image_size it accepts); pretrained on the "
        "public split like tiny-ir, then traced with torch.fx, BatchNorm folded and quantized",
        lambda v: _module_problem(v),
    )
    precision: str = _key(
        "int8", "what clients train: int8 (the MCU's quantized graph) or fp32", _choice("int8", "fp32")
    )
    classifier_precision: str = _key(
        "int8", "int8 classifier, or an fp32 head on int8 features", _choice("int8", "fp32")
    )
    calibration_samples: int = _key(512, "public-split images used to calibrate int8 activation ranges", _range(1))
    width: int = _key(16, "channels of the first convolution (later blocks scale from it)", _range(4, 256))
    pretrain_epochs: int = _key(30, "epochs of cloud pretraining on the server's public split", _range(0, 10_000))
    pretrain_lr: float = _key(
        0.05, "learning rate of cloud pretraining (SGD, momentum 0.9)", _range(0.0, 10.0, lo_open=True)
    )
    pretrain_batch_size: int = _key(32, "batch size of cloud pretraining", _range(1, 65_536))


@dataclass(frozen=True)
class TrainSection:
    optimizer: str = _key(
        "sgd+qas",
        "client optimizer: sgd, sgd+qas (int8 only), adam (the optimizers registered in fedtiny.int8.optimizers)",
        lambda v: _choice(*optimizer_names())(v),
    )
    lr: float = _key(
        0.0,
        "client learning rate; 0 = the model's: 0.005 for a model the cloud pretrains (tiny-ir, "
        "model.module), chosen on the server's public split for a pretrained model.file "
        "(the run log and summary's lr, lr_source say which)",
        _range(0.0, 1e9),
    )
    momentum: float = _key(0.0, "SGD momentum (0 = none; the state lives on the device)", _range(0.0, 0.999))
    local_epochs: int = _key(1, "local epochs per round", _range(1, 1000))
    batch_size: int = _key(16, "client batch size", _range(1, 65_536))
    weight_rounding: str = _key(
        "stochastic", "rounding of int8 weights after each step", _choice("stochastic", "nearest")
    )
    gradients: str = _key(
        "exact",
        "int8 models: exact = the exact step (integer sums, int8 output gradients with "
        "seeded stochastic rounding, fixed-point softmax: the same numbers on every CPU and on the "
        "device's C step); float = float32 gradients summed by PyTorch (CPU-dependent)",
        _choice("exact", "float"),
    )
    engine: str = _key(
        "torch",
        "what runs the exact step of simulated clients: torch, c (device/c's C99 step "
        "through ctypes, built by make install; the same numbers: slower on batches, faster one "
        "sample per step), or auto (c where it is built and runs the model, else torch)",
        _choice("torch", "c", "auto"),
    )
    shuffle: str = _key(
        "torch",
        "order of a client's samples in each epoch: torch (torch.randperm of the round's "
        "generator) or hash (a counter-based Fisher-Yates from the round's seed, the exact step's, that "
        "firmware computes too)",
        _choice("torch", "hash"),
    )
    scheme: str = _key(
        "full",
        "sparse-update scheme: full, bias-only, last-k:N, a JSON/TOML file (path relative to "
        "the scenario; schemes.json#id) or inline JSON; chosen per device: last-k:fit, search, "
        "fisher, random:N",
    )
    scheme_per_device: bool = _key(
        True,
        "a device-dependent scheme is chosen for each device profile of the fleet; "
        "false: the fleet's smallest device's scheme everywhere",
    )
    channels: str = _key(
        "static",
        "static: the scheme's channels every round; dynamic: each client draws its "
        "trained channels afresh each round (same layers and counts, seeded by client and round)",
        _choice("static", "dynamic"),
    )


@dataclass(frozen=True)
class SearchSection:
    epochs: int = _key(2, "contribution analysis: fine-tuning epochs per candidate", _range(1, 1000))
    lr: float = _key(0.0, "contribution analysis: learning rate (0: train.lr)", _range(0.0))
    samples: int = _key(0, "contribution analysis: public-split images used (seeded subset; 0: all)", _range(0))
    val_fraction: float = _key(0.3, "share of those images held out to measure the gains", _range(0.05, 0.9))
    shift: str = _key(
        "fleet",
        "fleet: see the public split through the fleet's sensor shift (what clients adapt to); none: as it is",
        _choice("fleet", "none"),
    )
    bias_grid: tuple[int, ...] = _key(
        (), "numbers of last convolutions whose biases are tried (empty: automatic)", _each(_range(0))
    )
    workers: int = _key(
        0,
        "contribution analysis: processes fine-tuning candidates side by side (0: run.num_cpus); "
        "the gains do not depend on it",
        _range(0, 256),
    )
    population: int = _key(32, "evolutionary search: population", _range(2, 100_000))
    generations: int = _key(30, "evolutionary search: generations", _range(1, 100_000))
    mutation: float = _key(0.1, "evolutionary search: probability of re-drawing a gene", _range(0.0, 1.0))
    crossover: float = _key(
        0.5, "evolutionary search: probability of taking a gene from the second parent", _range(0.0, 1.0)
    )
    budget_kb: int = _key(0, "search for this SRAM budget in KB instead of each device's", _range(0, 1 << 22))


@dataclass(frozen=True)
class DeviceSection:
    profiles: tuple[str, ...] = _key(
        ("mcu-256kb",),
        "device profiles of the clients, assigned round-robin by partition id (see fedtiny.devices)",
        _each(lambda v: None, nonempty=True),
    )
    custom_name: str = _key("custom", "name of the scenario's own profile (used when custom_sram_kb > 0)")
    custom_sram_kb: int = _key(0, "SRAM of the scenario's own profile in KB (0: no custom profile)", _range(0, 1 << 20))
    custom_flash_kb: int = _key(1024, "flash of the scenario's own profile in KB", _range(1, 1 << 22))
    custom_clock_mhz: int = _key(100, "clock of the scenario's own profile", _range(1, 10_000))
    enforce: bool = _key(True, "a client that does not fit its device refuses to train")
    fit: str = _key(
        "device",
        "what must fit the device's SRAM and flash: device (the whole client across a round: "
        "the step at train.batch_size, trained tensors, optimizer and uplink state, buffers, stack, as "
        "the firmware holds them; device_ram_bytes) or step (one training step, the publication's "
        "count; peak_sram_bytes)",
        _choice("device", "step"),
    )
    micro_batch: int = _key(1, "samples per on-device training step, for the memory check", _range(1, 4096))
    policy_frozen_first: int = _key(
        0,
        "privacy policy: a client refuses a scheme that trains any of the model's first N convolutions (0: none)",
        _range(0, 10_000),
    )
    policy_max_saturation: float = _key(
        1.0,
        "privacy policy: a client refuses a downlink that clamps more than this "
        "share of a layer's outputs on its own samples, as trap weights do (1: never)",
        _range(0.0, 1.0),
    )
    policy_max_change_lsb: int = _key(
        0,
        "privacy policy: a client clips each trained int8 weight's change per round "
        "to this many quantization steps before sending (0: no bound)",
        _range(0, 255),
    )
    kernels: str = _key(
        "optimized",
        "the clients' kernels, for device time and energy and for the firmware: optimized "
        "(fedtiny's DSP kernels, SXTB16/SMLAD) or reference (its portable loops), each priced per op "
        "kind as measured in QEMU on Cortex-M4/M7 profiles; other cores use their published cycles "
        "per MAC (reference: M4/M7 only)",
        _choice("optimized", "reference"),
    )
    accumulate: bool = _key(
        False,
        "the memory check counts fp32 accumulators of the trained parameters, which a "
        "device needs to train train.batch_size samples per step one micro-batch at a time "
        "(false: each micro-batch's gradient is applied at once, as tiny-training's engine does)",
    )
    reorder: bool = _key(True, "operator reordering (apply each weight gradient as soon as it is computed)")
    inplace_depthwise: bool = _key(True, "in-place depthwise convolutions")
    fuse_frozen: bool = _key(True, "fuse expansion+depthwise of blocks no gradient passes through")
    radio: str = _key(
        "",
        "the clients' radio for time and energy: ble-1m, ble-2m, 802.15.4, lora-sf7, lora-sf12, "
        "wifi (see fedtiny.devices); empty: each profile's own",
        lambda v: None if v == "" or v in _radios() else f"must be one of {', '.join(_radios())} or empty; got {v!r}",
    )


@dataclass(frozen=True)
class CompressionSection:
    uplink: str = _key(
        "dense",
        "dense: whole trained tensors; sparse: the change, top-k, quantized, in fedtiny's wire format",
        lambda v: _choice(*uplink_names())(v),
    )
    density: float = _key(
        1.0, "top-k density of the sparse uplink (share of trainable elements sent)", _range(0.0, 1.0, lo_open=True)
    )
    topk: str = _key("tensor", "top-k per tensor or over all tensors", _choice("tensor", "global"))
    warmup_rounds: int = _key(0, "rounds of exponential density warm-up (DGC); 0 = none", _range(0, 100_000))
    warmup_start_density: float = _key(0.25, "density of the first warm-up round", _range(0.0, 1.0, lo_open=True))
    values: str = _key("int8", "value type of the sparse uplink", lambda v: _choice(*value_type_names())(v))
    error_feedback: bool = _key(True, "keep what was not sent and add it to the next round's change")
    residual: str = _key(
        "float64",
        "how the error-feedback residual is kept between rounds: float64, or compact "
        "(int16 in 1/256 quantization steps, saturating, for int8 tensors; float32 for int32 ones: "
        "what fits a 64 KB device; the firmware keeps it the same way)",
        _choice("float64", "compact"),
    )
    momentum_correction: bool = _key(False, "DGC momentum correction (a velocity over rounds) when train.momentum > 0")
    downlink: str = _key(
        "full",
        "full model every round, or the change since the client's last round when smaller",
        _choice("full", "delta"),
    )


@dataclass(frozen=True)
class AttackSection:
    enabled: bool = _key(False, "the server attacks chosen clients' updates at chosen rounds (results: privacy.json)")
    clients: tuple[int, ...] = _key((0,), "partition ids to attack", _each(_range(0)))
    rounds: tuple[int, ...] = _key((1,), "rounds in which to attack them", _each(_range(1)))
    server: str = _key(
        "honest",
        "honest (the server sends the federation's model and scheme and only looks at what "
        "comes back) or malicious (from round 1 it sends tiny-ir's imprint trap and a scheme that "
        "trains the trap layer; needs attack.method = imprint)",
        _choice("honest", "malicious"),
    )
    method: str = _key(
        "ig",
        "dlg (L2, L-BFGS), ig (cosine + TV, signed Adam), rounding (int8 updates: distance "
        "outside each sent integer's rounding interval, in LSB, + TV; needs attack.unroll or one "
        "local step) or imprint (the malicious server's analytic attack on its trap)",
        lambda v: _choice(*ATTACK_METHODS.names())(v),
    )
    iterations: int = _key(500, "optimizer iterations", _range(1, 1_000_000))
    restarts: int = _key(4, "random starts per target, solved together; the best match is kept", _range(1, 64))
    unroll: bool = _key(
        True,
        "simulate the client's local steps exactly (costly); false: match one gradient "
        "(cosine is scale-free, close when lr * steps is small)",
    )
    labels: str = _key("idlg", "idlg (recovered from the update) or known", _choice("idlg", "known"))
    tv: float = _key(1e-4, "total-variation weight (ig)", _range(0.0))
    max_images: int = _key(8, "attack clients holding at most this many training images", _range(1, 4096))
    observe: str = _key(
        "client",
        "what the attacker sees: client (each targeted client's decoded update) or "
        "aggregate (only the round's combined change over every accepted client, as behind secure "
        "aggregation; attack.clients is then ignored) or both (each scored apart: privacy_* and "
        "privacy_aggregate_* in summary.json)",
        _choice("client", "aggregate", "both"),
    )


FAULT_KINDS = ("crash", "garbage", "truncated", "stale", "bad_count")


def _radios() -> list[str]:
    return list(RADIOS)


@dataclass(frozen=True)
class FleetSection:
    availability: str = _key(
        "always",
        "who can be sampled: always; random (each client awake in a round with "
        "probability availability_rate); diurnal (each client awake for diurnal_awake_fraction "
        "of every diurnal_period_rounds rounds, from its own seeded phase)",
        _choice("always", "random", "diurnal"),
    )
    availability_rate: float = _key(
        0.5, "random availability: probability a client is awake in a round", _range(0.0, 1.0, lo_open=True)
    )
    diurnal_period_rounds: int = _key(24, "diurnal availability: rounds per day", _range(1, 100_000))
    diurnal_awake_fraction: float = _key(
        0.5, "diurnal availability: share of the day a client is awake", _range(0.0, 1.0, lo_open=True)
    )
    deadline_s: float = _key(
        0.0,
        "simulated seconds a client has for its round (compute + radio); a slower "
        "client is a straggler and its update is dropped; 0: no deadline",
        _range(0.0),
    )
    partial_work: bool = _key(
        False, "a client that would miss the deadline trains only the steps that fit and sends that"
    )
    faults: tuple[tuple[str, float], ...] = _key(
        (),
        "injected faults: a table [fleet.faults] of KIND = rate (the "
        "probability a sampled client has it in a round); kinds: " + ", ".join(FAULT_KINDS),
    )
    malicious_fraction: float = _key(
        0.0, "share of the clients (a seeded fixed set) that send a poisoned change", _range(0.0, 1.0)
    )
    malicious_kind: str = _key(
        "sign-flip",
        "sign-flip (minus malicious_scale times the honest change) or scale (malicious_scale times it)",
        _choice("sign-flip", "scale"),
    )
    malicious_scale: float = _key(10.0, "factor of the poisoned change", _range(0.0, 1e6, lo_open=True))
    target_accuracy: float = _key(
        0.9, "summary: simulated fleet time until the global accuracy first reaches this", _range(0.0, 1.0)
    )


@dataclass(frozen=True)
class ServerSection:
    aggregation: str = _key(
        "fedavg",
        "how accepted changes are combined: fedavg, or robust to a minority of bad "
        "clients: median, trimmed-mean, krum (the rules registered in fedtiny.rules)",
        lambda v: _choice(*rule_names())(v),
    )
    trim_fraction: float = _key(
        0.1, "trimmed-mean: share of the smallest and of the largest values dropped per element", _range(0.0, 0.49)
    )
    krum_byzantine: int = _key(
        1, "krum: bad clients tolerated (f); each change is scored on its n - f - 2 nearest", _range(0, 100_000)
    )
    krum_selected: int = _key(1, "krum: changes kept and averaged (1: Krum, more: Multi-Krum)", _range(1, 100_000))


@dataclass(frozen=True)
class PrivacySection:
    dp: str = _key(
        "none",
        "differential privacy of client changes: none; local (each client clips its change and adds "
        "Gaussian noise before sparsifying and quantizing it); central (the server clips each change and "
        "adds the noise to their sum)",
        _choice("none", "local", "central"),
    )
    clip_norm: float = _key(
        1.0,
        "L2 bound of a client's whole change, in real units (int8 changes times their scales)",
        _range(0.0, lo_open=True),
    )
    noise_multiplier: float = _key(1.0, "noise standard deviation over clip_norm", _range(0.0, 1e6, lo_open=True))
    delta: float = _key(1e-5, "the delta at which summary.json reports dp_epsilon", _range(0.0, 1.0, lo_open=True))


@dataclass(frozen=True)
class BridgeSection:
    devices: tuple[tuple[int, str], ...] = _key(
        (),
        "partitions served by real devices over the bridge protocol: "
        "a table [bridge.devices] of PARTITION = ADDRESS, where ADDRESS is "
        '"HOST:PORT" (TCP), "serial:HOST:PORT" (a serial line behind a '
        'TCP port) or "serial:/dev/ttyACM0@115200" (a serial port; '
        '"serial:COM3@115200" on Windows; 115200 baud unless given)',
    )
    timeout_s: float = _key(
        30.0,
        "idle timeout: seconds without a byte from a bridged device before its round fails "
        "(a training device sends BUSY keep-alives)",
        _range(0.1, 86_400),
    )
    round_timeout_s: float = _key(
        3600.0,
        "seconds a bridged device's whole round (HELLO to UPDATE) may take; 0: no limit",
        _range(0.0, 7 * 86_400),
    )


@dataclass(frozen=True)
class Scenario:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    shift: ShiftSection = field(default_factory=ShiftSection)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    device: DeviceSection = field(default_factory=DeviceSection)
    compression: CompressionSection = field(default_factory=CompressionSection)
    attack: AttackSection = field(default_factory=AttackSection)
    bridge: BridgeSection = field(default_factory=BridgeSection)
    search: SearchSection = field(default_factory=SearchSection)
    fleet: FleetSection = field(default_factory=FleetSection)
    server: ServerSection = field(default_factory=ServerSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    # A sweep: method name -> {"section.key": value} overrides (validated like --set).
    methods: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Return the resolved scenario as nested plain dicts (TOML/JSON ready)."""
        d = {
            f.name: {
                k.name: _plain(str(k.type), getattr(getattr(self, f.name), k.name))
                for k in dataclasses.fields(getattr(self, f.name))
            }
            for f in dataclasses.fields(self)
            if f.name != "methods"
        }
        if self.methods:
            d["methods"] = {name: dict(items) for name, items in self.methods}
        return d

    def expand(self) -> list[tuple[str, "Scenario"]]:
        """The sweep's scenarios, one per method (just ``self`` when there is no sweep)."""
        if not self.methods:
            return [(self.run.name, self)]
        base = {k: v for k, v in self.to_dict().items() if k != "methods"}
        return [
            (
                name,
                _build(
                    f"methods.{name}",
                    _merge(base, {"run.name": f"{self.run.name}-{name}", **dict(items)}, "methods." + name),
                ),
            )
            for name, items in self.methods
        ]

    def to_json(self) -> str:
        """Return a canonical JSON string of the resolved scenario."""
        return self._json

    @functools.cached_property
    def _json(self) -> str:
        # Made once per scenario (it is frozen): every client round of a cohort keys the task cache with it,
        # and writing it out each time took 0.4 ms of a float client's round (bench peers).
        return json.dumps(self.to_dict(), sort_keys=True)

    def device_address(self, partition_id: int) -> str:
        """The address of the device serving ``partition_id`` over the bridge ('' for a simulated client)."""
        return dict(self.bridge.devices).get(partition_id, "")

    @property
    def scheme_text(self) -> str:
        """``train.scheme`` with ``{model}`` replaced by the model's name (a model file's stem, a
        ``model.module``'s function name).

        One sweep then serves every published model: ``schemes.json#{model}/s3``.
        """
        name = (
            Path(self.model.file).stem
            if self.model.file
            else self.model.module.rpartition(":")[2]
            if self.model.module
            else self.model.name
        )
        return self.train.scheme.replace("{model}", name)

    @property
    def clients_per_round(self) -> int:
        """Clients sampled per round after resolving ``0 = all``."""
        return self.run.clients_per_round or self.run.clients


_SECTIONS: dict[str, type] = {
    "run": RunSection,
    "data": DataSection,
    "shift": ShiftSection,
    "model": ModelSection,
    "train": TrainSection,
    "device": DeviceSection,
    "compression": CompressionSection,
    "attack": AttackSection,
    "bridge": BridgeSection,
    "search": SearchSection,
    "fleet": FleetSection,
    "server": ServerSection,
    "privacy": PrivacySection,
}
_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
_INT_LIST, _STR_LIST, _ADDRESSES = "tuple[int, ...]", "tuple[str, ...]", "tuple[tuple[int, str], ...]"
_RATES = "tuple[tuple[str, float], ...]"
# How the list-valued types read in docs and in a TOML file.
_TYPE_NAMES = {
    _INT_LIST: "list[int]",
    _STR_LIST: "list[str]",
    _ADDRESSES: "table[int, str]",
    _RATES: "table[str, float]",
}


def schema_rows() -> list[tuple[str, str, Any, str]]:
    """Return ``(key, type, default, help)`` for every key (for docs and ``--help``)."""
    rows = []
    for section, cls in _SECTIONS.items():
        for f in dataclasses.fields(cls):
            rows.append(
                (
                    f"{section}.{f.name}",
                    _TYPE_NAMES.get(str(f.type), str(f.type)),
                    _plain(str(f.type), f.default),
                    f.metadata["help"],
                )
            )
    return rows


def _plain(type_name: str, value: Any) -> Any:
    """A key's value as TOML/JSON has it: lists for lists, a table for the device addresses."""
    if type_name in (_ADDRESSES, _RATES):
        return {str(k): v for k, v in value}
    return list(value) if isinstance(value, tuple) else value


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(where: str, key: str, value: Any, type_name: str) -> Any:
    if type_name in (_INT_LIST, _STR_LIST):
        return _coerce_list(where, key, value, int if type_name == _INT_LIST else str)
    if type_name == _ADDRESSES:
        return _coerce_addresses(where, key, value)
    if type_name == _RATES:
        return _coerce_rates(where, key, value)
    expected = _TYPES[type_name]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) and expected is not bool:
        raise ScenarioError(f"{where}: {key}: expected {type_name}, got bool {value!r}")
    if not isinstance(value, expected):
        raise ScenarioError(f"{where}: {key}: expected {type_name}, got {type(value).__name__} {value!r}")
    return value


def _coerce_list(where: str, key: str, value: Any, item: type) -> tuple:
    """A TOML array; a single value; or (older scenarios, ``--set a,b``) a comma-separated string."""
    kind = "integers" if item is int else "strings"
    if isinstance(value, str) and (item is int or "," in value):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        if item is int:
            if not all(p.lstrip("-").isdigit() for p in parts):
                raise ScenarioError(f"{where}: {key}: expected a list of {kind}, got {value!r}")
            return tuple(int(p) for p in parts)
        return tuple(parts)
    if isinstance(value, item) and not isinstance(value, bool):
        return (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
        raise ScenarioError(f"{where}: {key}: expected a list of {kind}, got {type(value).__name__} {value!r}")
    return tuple(v.strip() if item is str else v for v in value)


def _coerce_addresses(where: str, key: str, value: Any) -> tuple[tuple[int, str], ...]:
    """A table ``PARTITION = "ADDRESS"``, or (older scenarios) the string ``"1=HOST:PORT,3=HOST:PORT"``.

    Each address is checked by :func:`fedtiny.bridge.address.parse_address` (TCP, serial over TCP,
    serial port with its baud rate).
    """
    if isinstance(value, str):
        table = {}
        for item in filter(None, (p.strip() for p in value.split(","))):
            pid, sep, addr = item.partition("=")
            if not sep:
                raise ScenarioError(f"{where}: {key}: expected PARTITION=ADDRESS entries, got {item!r}")
            table[pid.strip()] = addr.strip()
        value = table
    if not isinstance(value, Mapping):
        raise ScenarioError(
            f'{where}: {key}: expected a table of PARTITION = "ADDRESS", got {type(value).__name__} {value!r}'
        )
    out = {}
    for pid, addr in value.items():
        if isinstance(pid, str) and pid.strip().isdigit():
            pid = int(pid)
        if not isinstance(pid, int) or isinstance(pid, bool) or pid < 0:
            raise ScenarioError(f"{where}: {key}: partition {pid!r} is not a partition id (an integer >= 0)")
        problem = address_problem(addr)
        if problem:
            raise ScenarioError(f"{where}: {key}: partition {pid}: {problem}")
        out[pid] = addr.strip()
    return tuple(sorted(out.items()))


def _coerce_rates(where: str, key: str, value: Any) -> tuple[tuple[str, float], ...]:
    """A table ``KIND = rate`` of fault kinds, each rate in [0, 1], together at most 1."""
    if not isinstance(value, Mapping):
        raise ScenarioError(
            f"{where}: {key}: expected a table [{key}] of KIND = rate, got {type(value).__name__} {value!r}"
        )
    out = {}
    for kind, rate in value.items():
        if kind not in FAULT_KINDS:
            raise ScenarioError(
                f"{where}: {key}.{kind}: unknown fault{_suggest(str(kind), list(FAULT_KINDS))}; "
                f"known: {', '.join(FAULT_KINDS)}"
            )
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
            raise ScenarioError(f"{where}: {key}.{kind}: expected a rate in [0, 1], got {rate!r}")
        out[kind] = float(rate)
    if sum(out.values()) > 1.0 + 1e-12:
        raise ScenarioError(
            f"{where}: {key}: the rates add up to {sum(out.values()):g}; a client has at most one "
            "fault per round, so they must add up to at most 1"
        )
    return tuple(sorted(out.items()))


# Keys naming a file: a relative path is read against the scenario file's folder.
_FILE_KEYS = ("train.scheme", "model.file", "model.module")


def _module_problem(value: str) -> str | None:
    # deferred: it needs torch; the scenario loads without it (fedtiny --help, a bad --set answer at once)
    from fedtiny.models.user import module_problem

    return module_problem(value)


def _key_path(key: str, value: Any, base_dir: Path | None) -> Any:
    return _module_path(value, base_dir) if key == "model.module" else _file_path(value, base_dir)


def _module_path(value: Any, base_dir: Path | None) -> Any:
    """``model.module``: a ``file.py:function`` named relative to the scenario's folder, made absolute."""
    if base_dir is None or not isinstance(value, str) or ":" not in value:
        return value
    where, _, func = value.rpartition(":")
    if not (where.endswith(".py") or "/" in where or "\\" in where) or Path(where).is_absolute():
        return value  # a dotted module name, or an absolute path
    if (base_dir / where).is_file() or not Path(where).is_file():
        return f"{(base_dir / where).resolve()}:{func}"
    return value


def _file_path(value: Any, base_dir: Path | None) -> Any:
    """A file named relative to the scenario's folder, made absolute (other values unchanged).

    A path that exists only relative to the working directory (a ``--set`` typed in a
    shell) is kept; ``#entry`` suffixes (``schemes.json#id``) and inline JSON pass through.
    """
    if base_dir is None or not isinstance(value, str) or not value or value.lstrip().startswith("{"):
        return value
    file_part, _, entry = value.partition("#")
    if not file_part or Path(file_part).is_absolute() or not Path(file_part).suffix:
        return value  # presets such as "last-k:2" and absolute paths
    if (base_dir / file_part).is_file() or not Path(file_part).is_file():
        return str((base_dir / file_part).resolve()) + (f"#{entry}" if entry else "")
    return value


def _build(where: str, raw: Mapping[str, Any], base_dir: Path | None = None) -> Scenario:
    sections: dict[str, Any] = {}
    methods = raw.get("methods", {})
    raw = {k: v for k, v in raw.items() if k != "methods"}
    for name, table in raw.items():
        if name not in _SECTIONS:
            raise ScenarioError(f"{where}: [{name}]: unknown section{_suggest(name, list(_SECTIONS))}")
        if not isinstance(table, Mapping):
            raise ScenarioError(f"{where}: {name}: expected a table [{name}], got {type(table).__name__}")
    for name, cls in _SECTIONS.items():
        table = dict(raw.get(name, {}))
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, value in table.items():
            full = f"{name}.{key}"
            if key not in fields:
                raise ScenarioError(f"{where}: {full}: unknown key{_suggest(key, list(fields))}")
            f = fields[key]
            value = _coerce(where, full, value, str(f.type))
            problem = f.metadata["check"](value) if f.metadata["check"] else None
            if problem:
                raise ScenarioError(f"{where}: {full}: {problem}")
            values[key] = value
        sections[name] = cls(**values)
    scenario = Scenario(**sections)
    _check_cross(where, scenario)
    if methods:
        if not isinstance(methods, Mapping):
            raise ScenarioError(f'{where}: methods: expected tables [methods.NAME] of "section.key" = value')
        items = []
        for name, over in methods.items():
            if not isinstance(over, Mapping):
                raise ScenarioError(f'{where}: methods.{name}: expected a table of "section.key" = value')
            flat = _flatten(over)
            for key in _FILE_KEYS:
                if key in flat:
                    flat[key] = _key_path(key, flat[key], base_dir)
            _build(f"{where}: methods.{name}", _merge(scenario.to_dict(), flat, f"{where}: methods.{name}"))
            items.append((str(name), tuple(sorted(flat.items()))))
        scenario = dataclasses.replace(scenario, methods=tuple(items))
    return scenario


def _flatten(over: Mapping[str, Any]) -> dict[str, Any]:
    """``{"train.lr": 1}`` or ``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``."""
    flat = {}
    for k, v in over.items():
        if isinstance(v, Mapping) and "." not in k:  # a section's table ("fleet.faults" is a table-valued key)
            for k2, v2 in v.items():
                flat[f"{k}.{k2}"] = v2
        else:
            flat[k] = v
    return flat


def _merge(base: Mapping[str, Any], overrides: Mapping[str, Any], where: str) -> dict[str, Any]:
    merged = {k: dict(v) for k, v in base.items()}
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if not name:
            raise ScenarioError(f"{where}: {key}: expected section.key")
        merged.setdefault(section, {})[name] = value
    return merged


def _trap_fits(s: Scenario) -> bool:
    """Whether a malicious server's trap exists for ``s``'s model and images (fedtiny.attack.malicious and
    fedtiny.attack.trap_mbconv; whether a published network's layout can hold it is checked when it is built)."""
    square = s.data.image_width in (0, s.data.image_size) and s.data.channels == 3
    if str(s.model.file or "").endswith(".pkl"):
        return square and s.data.image_size == 128
    return (
        square
        and s.model.name == "tiny-ir"
        and not s.model.file
        and not s.model.module
        and s.model.width == 16
        and s.data.image_size == 32
    )


def _check_cross(where: str, s: Scenario) -> None:
    if s.run.clients_per_round > s.run.clients:
        raise ScenarioError(
            f"{where}: run.clients_per_round: must be <= run.clients ({s.run.clients}), got {s.run.clients_per_round}"
        )
    if s.data.public_fraction + s.data.test_fraction >= 0.95:
        raise ScenarioError(
            f"{where}: data.public_fraction: public_fraction + test_fraction must leave data for the clients "
            f"(< 0.95), got {s.data.public_fraction + s.data.test_fraction:g}"
        )
    if (
        s.train.gradients == "exact"
        and s.model.precision == "int8"
        and (not optimizer_kind(s.train.optimizer).exact or s.model.classifier_precision == "fp32")
    ):
        raise ScenarioError(
            f"{where}: train.gradients: the exact step trains an int8 classifier with sgd or "
            f"sgd+qas (got optimizer {s.train.optimizer!r}, classifier "
            f'{s.model.classifier_precision!r}); set train.gradients = "float"'
        )
    if s.train.engine == "c" and (s.train.gradients != "exact" or s.model.precision != "int8"):
        raise ScenarioError(
            f"{where}: train.engine: c runs the exact step of an int8 model; it needs "
            f'train.gradients = "exact" and model.precision = "int8"'
        )
    if optimizer_kind(s.train.optimizer).qas and s.model.precision != "int8":
        raise ScenarioError(
            f"{where}: train.optimizer: {s.train.optimizer} scales int8 gradients; it needs "
            f'model.precision = "int8" (got {s.model.precision!r})'
        )
    # deferred: the schemes need torch; the scenario loads without it (fedtiny --help, a bad --set answer at once)
    from fedtiny.budget.schemes import SchemeError, parse_scheme

    try:
        parse_scheme(s.scheme_text)
    except SchemeError as exc:
        raise ScenarioError(f"{where}: train.scheme: {exc}") from None
    if s.train.scheme != "full" and s.model.precision != "int8":
        raise ScenarioError(
            f"{where}: train.scheme: sparse-update schemes apply to the int8 graph; "
            f'set model.precision = "int8" (got {s.model.precision!r})'
        )

    for name in (p.lower() for p in s.device.profiles):
        if name not in PROFILES and not (s.device.custom_sram_kb and name == s.device.custom_name.lower()):
            raise ScenarioError(
                f"{where}: device.profiles: unknown profile {name!r}; known: "
                f"{', '.join(sorted(PROFILES))}"
                + (" (or set device.custom_sram_kb)" if not s.device.custom_sram_kb else "")
            )
    if s.model.file and s.model.module:
        raise ScenarioError(
            f"{where}: model.module: set model.file (an int8 model file) or model.module (a float "
            f"PyTorch model), not both"
        )
    if s.model.head == "keep" and not s.model.file:
        raise ScenarioError(f"{where}: model.head: keep uses the classifier of model.file, which is not set")
    if s.model.file and s.model.precision != "int8":
        raise ScenarioError(
            f"{where}: model.precision: a model file is an int8 network; set model.precision = "
            f'"int8" (got {s.model.precision!r})'
        )
    server = ATTACK_METHODS.fact(s.attack.method, "server", "honest")  # the server the method needs
    if s.attack.enabled and s.attack.server != server:
        needs = [n for n in ATTACK_METHODS.names() if ATTACK_METHODS.fact(n, "server", "honest") == s.attack.server]
        raise ScenarioError(
            f"{where}: attack.method: {s.attack.method} needs attack.server = {server!r}; with attack.server = "
            f"{s.attack.server!r} the methods are {', '.join(needs)} (imprint reads the malicious server's trap)"
        )
    if s.attack.enabled and s.attack.server == "malicious" and not _trap_fits(s):
        raise ScenarioError(
            f"{where}: attack.server: the malicious server's trap is built for the built-in tiny-ir "
            f"(model.width = 16) on 3x32x32 images (data.image_size = 32, data.channels = 3), and for "
            f"a published int8 model (model.file = a tiny-training .pkl) on 3x128x128 images"
        )
    if s.run.cohort_size > 1 and s.bridge.devices:
        raise ScenarioError(
            f"{where}: run.cohort_size: a cohort runs its virtual clients in the simulation, so the "
            f"partitions of [bridge.devices] ({', '.join(str(p) for p, _ in s.bridge.devices)}) would "
            f"not reach their devices; keep run.cohort_size = 1 with bridged devices"
        )
    if s.privacy.dp == "central" and not rule_named(s.server.aggregation).streams:
        raise ScenarioError(
            f"{where}: privacy.dp: central DP adds its noise to the clipped changes' mean; it needs "
            f'a rule of weighted sums, server.aggregation = "fedavg" (got {s.server.aggregation!r})'
        )
    if s.data.image_width and not s.data.image_size:
        raise ScenarioError(
            f"{where}: data.image_width: set data.image_size too (the height; got image_width "
            f"{s.data.image_width} alone)"
        )
    if DATA_SOURCES.fact(s.data.source, "needs_root") and not s.data.root:
        raise ScenarioError(f"{where}: data.root: source '{s.data.source}' needs a local dataset root")


def parse_overrides(items: list[str] | str) -> dict[str, Any]:
    """Parse ``key=value`` overrides (a list, or one ``;``-separated string).

    Values are read as TOML literals (``0.1``, ``true``, ``"x"``); anything that is
    not a TOML literal is taken as a bare string.
    """
    if isinstance(items, str):
        items = [p for p in (s.strip() for s in items.split(";")) if p]
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ScenarioError(f"--set: {item!r}: expected key=value")
        key, text = (s.strip() for s in item.split("=", 1))
        if key.count(".") != 1:
            raise ScenarioError(f"--set: {key}: expected section.key (e.g. train.lr)")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        out[key] = value
    return out


def load_scenario(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Scenario:
    """Load, apply overrides to, and validate a scenario file.

    Parameters
    ----------
    path
        TOML scenario file.
    overrides
        ``{"section.key": value}`` applied on top of the file (``--set``).

    Raises
    ------
    ScenarioError
        On a missing file, invalid TOML, unknown section/key, wrong type or
        out-of-range value. The message names the file and the key.
    """
    path = Path(path)
    where = str(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ScenarioError(f"{where}: no such scenario file") from None
    except IsADirectoryError:
        raise ScenarioError(f"{where}: is a directory, expected a TOML scenario file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{where}: invalid TOML: {exc}") from None
    return scenario_from_dict(raw, overrides, where=where, base_dir=path.parent)


def scenario_from_dict(
    raw: Mapping[str, Any],
    overrides: Mapping[str, Any] | None = None,
    *,
    where: str = "<scenario>",
    base_dir: Path | None = None,
) -> Scenario:
    """Validate a scenario given as nested dicts (e.g. the JSON a Flower app receives).

    ``base_dir`` is the scenario file's folder: a scheme file named relative to it
    is stored with its resolved path.
    """
    merged = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        if not name:
            raise ScenarioError(f"{where}: {key}: override must be section.key")
        table = merged.setdefault(section, {})
        if isinstance(table, dict) and section != "methods":
            table[name] = value
    for key in _FILE_KEYS:
        section, _, name = key.partition(".")
        if isinstance(merged.get(section), dict) and name in merged[section]:
            merged[section][name] = _key_path(key, merged[section][name], base_dir)
    return _build(where, merged, base_dir)


def scenario_from_json(text: str, *, where: str = "<scenario json>") -> Scenario:
    """Validate a scenario sent as JSON (as the server sends it to clients)."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ScenarioError(f"{where}: invalid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ScenarioError(f"{where}: expected a JSON object")
    return scenario_from_dict(raw, where=where)
