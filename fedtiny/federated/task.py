"""What a scenario trains: its model, the tensors on the wire, and the cloud-pretrained start."""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fedtiny.budget.device_memory import ClientLoad, DeviceMemory, client_memory, step_arena
from fedtiny.budget.memory import MemoryReport, memory_report, schedule, step_macs, step_work
from fedtiny.budget.schemes import ResolvedScheme, apply_scheme, trainable_slices
from fedtiny.budget.step_time import StepWork
from fedtiny.compress.dense import Spec
from fedtiny.compress.sparsify import CompressionConfig
from fedtiny.compress.uplink import Uplink
from fedtiny.data import Federation, load_federation
from fedtiny.devices import DeviceProfile, Radio, get_profile, get_radio, with_kernels
from fedtiny.errors import ModelFileError, ScenarioError
from fedtiny.federated.train import evaluate, pretrain
from fedtiny.int8.convert import ptq
from fedtiny.int8.graph import replace_head, unit_scale
from fedtiny.int8.lite_residual import extend_lite, is_lite, parse_lite
from fedtiny.int8.modelfile import read_model
from fedtiny.int8.prefix import PrefixStore
from fedtiny.int8.transfer import fit_head
from fedtiny.models import array_spec, build_model, model_arrays, trainable_names
from fedtiny.models.user import build_user_model
from fedtiny.scenario import Scenario

__all__ = [
    "Task",
    "CloudReport",
    "make_task",
    "client_load",
    "with_scheme",
    "cloud_model",
    "limit_threads",
    "client_profile",
    "client_radio",
]


@dataclass
class Task:
    """A scenario's federation, the model clients train, and its wire specs.

    Attributes
    ----------
    model
        What a client trains: the int8 graph (:class:`~fedtiny.int8.graph.QModel`)
        or, with ``model.precision = "fp32"``, the float network (BatchNorm frozen).
    downlink_spec
        Tensors the server sends: the whole model state in on-device dtypes.
    uplink_spec
        Tensors a client sends back: the ones it trains.
    """

    scenario: Scenario
    federation: Federation
    model: nn.Module
    downlink_spec: Spec
    uplink_spec: Spec
    scheme: ResolvedScheme | None = None
    _memory: dict = field(default_factory=dict, repr=False)

    @functools.cached_property
    def slices(self) -> dict[str, np.ndarray]:
        """Flat positions of each uplink tensor that the scheme lets a client change."""
        return trainable_slices(self.model, self.uplink_spec)

    @functools.cached_property
    def units(self) -> dict[str, np.ndarray]:
        """Real value of one stored unit of each element of each uplink tensor (flat, float64).

        Differential privacy clips and adds its noise in real units, whatever a tensor's storage.
        """
        return {
            n: np.broadcast_to(unit_scale(self.model, n).numpy(), shape).ravel().copy()
            for n, shape, _ in self.uplink_spec
        }

    @functools.cached_property
    def uplink(self) -> Uplink:
        """The uplink encoder (client) and decoder (server) of this scenario."""
        return make_uplink(self.scenario, self.uplink_spec, self.slices)

    def memory(self, profile: DeviceProfile) -> MemoryReport | None:
        """The memory report of one training step on ``profile`` (None for an fp32 model)."""
        if self.scheme is None:
            return None
        key = (profile.name, self.scheme.layout())  # views of one model share this cache
        if key not in self._memory:
            d, t = self.scenario.device, self.scenario.train
            self._memory[key] = memory_report(
                self.model,
                self.scheme,
                self.federation.image_shape,
                device=profile,
                optimizer=t.optimizer,
                momentum=t.momentum,
                reorder=d.reorder,
                inplace_depthwise=d.inplace_depthwise,
                fuse_frozen=d.fuse_frozen,
                batch=d.micro_batch,
                accumulate=d.accumulate and t.batch_size > d.micro_batch,
            )
        return self._memory[key]

    def device_memory(self, profile: DeviceProfile, samples: int) -> DeviceMemory | None:
        """The whole client's RAM and flash across a round on ``profile`` with ``samples`` training samples
        (:mod:`fedtiny.budget.device_memory`; None for an fp32 model). The step is counted as the device
        runs it: with more samples per step than ``device.micro_batch``, with its accumulators."""
        if self.scheme is None:
            return None
        d, t = self.scenario.device, self.scenario.train
        key = ("device", profile.name, self.scheme.layout(), samples)
        if key not in self._memory:
            apply_scheme(self.model, self.scheme)
            load = client_load(self.scenario, samples, self.federation.image_shape)
            arena = step_arena(
                self.model,
                self.federation.image_shape,
                load,
                optimizer=t.optimizer,
                momentum=t.momentum,
                reorder=d.reorder,
                inplace_depthwise=d.inplace_depthwise,
                fuse_frozen=d.fuse_frozen,
            )
            self._memory[key] = client_memory(
                self.model, arena, load, optimizer=t.optimizer, momentum=t.momentum, profile=profile
            )
        return self._memory[key]

    def sample_work(self, profile: DeviceProfile):
        """One sample's work by op kind and part (:class:`fedtiny.budget.step_time.StepWork`; the planner's
        schedule, an fp32 network counted on its int8 twin with everything trained)."""
        report = self.memory(profile)
        if report is not None:
            return report.work

        return self._fp32_counts()[0]

    def sample_macs(self, profile: DeviceProfile) -> tuple[int, int]:
        """Forward and backward multiply-accumulates of training on one sample (the planner's schedule).

        An fp32 network is counted on its int8 twin (the same convolutions, BatchNorm folded),
        with everything trained.
        """
        report = self.memory(profile)
        if report is not None:
            batch = self.scenario.device.micro_batch
            return report.macs_forward // batch, report.macs_backward // batch

        return self._fp32_counts()[1]

    def _fp32_counts(self) -> tuple[StepWork, tuple[int, int]]:
        """One sample's work and ``(forward, backward)`` MACs of an fp32 network's int8 twin, everything trained.

        Counted once: the twin is the task's own and nothing changes it, and every client of a float run
        asks (counting the schedule took 0.2-0.7 ms of each client's round, bench peers).
        """
        if "fp32-counts" not in self._memory:
            twin = _to_int8(self.scenario, self.model, np.zeros((1, *self.federation.image_shape), np.float32))
            for p in twin.parameters():
                p.requires_grad_(True)
            ops = schedule(twin, self.federation.image_shape, 1)
            self._memory["fp32-counts"] = (step_work(ops), step_macs(ops))
        return self._memory["fp32-counts"]


@dataclass(frozen=True)
class CloudReport:
    """How the cloud-pretrained model and its int8 conversion score on the global test set."""

    pretrain_train_accuracy: float
    fp32_accuracy: float
    ptq_accuracy: float | None
    lr: float | None = None  # the clients' learning rate (fedtiny.federated.lr) and where it came from
    lr_source: str = ""


def _fp32_model(scenario: Scenario, fed: Federation) -> nn.Module:
    """The float network the cloud pretrains: ``model.module``'s, or the built-in ``model.name``."""
    c, h, _ = fed.image_shape
    m = scenario.model
    if m.module:
        return build_user_model(m.module, c, fed.num_classes, image_size=h, seed=scenario.run.seed)
    return build_model(m.name, c, fed.num_classes, width=m.width, image_size=h, seed=scenario.run.seed)


def _to_int8(scenario: Scenario, fp32: nn.Module, calibration: np.ndarray) -> nn.Module:
    try:
        return ptq(fp32, calibration, classifier_precision=scenario.model.classifier_precision)
    except ModelFileError as exc:
        if scenario.model.module:  # the user's network: name the key (a layer without an int8 op, a failed trace)
            raise ModelFileError(f"model.module: {exc}") from None
        raise


def _with_lite(scenario: Scenario, model: nn.Module) -> nn.Module:
    """``model`` with TinyTL's lite residual modules when ``train.scheme`` asks for them (the same
    modules, seeded by ``run.seed``, wherever the task's int8 layout is made)."""
    text = scenario.scheme_text
    if not is_lite(text):
        return model
    if scenario.model.precision != "int8":
        raise ScenarioError(f"train.scheme = {text}: lite residual modules are int8 (model.precision = int8)")
    try:
        return extend_lite(model, parse_lite(text), seed=scenario.run.seed)
    except ModelFileError as exc:
        raise ScenarioError(f"train.scheme = {text}: {exc}") from None


def _file_model(scenario: Scenario, fed: Federation) -> nn.Module:
    """The int8 network of ``model.file`` with a new classifier for the data's classes."""
    m = scenario.model
    try:
        model = read_model(m.file)
    except ModelFileError as exc:
        raise ModelFileError(f"model.file: {exc}") from None
    want = model.input_shape or (model.input_channels, *fed.image_shape[1:])
    if tuple(want) != tuple(fed.image_shape):
        c, h, w = want
        given = "x".join(map(str, fed.image_shape))
        raise ScenarioError(
            f"model.file: {m.file} takes {c}x{h}x{w} images but the data gives {given}: "
            f"set data.image_size = {h}"
            + (f" and data.image_width = {w}" if w != h else "")
            + (f" and data.channels = {c}" if c != fed.image_shape[0] else "")
            + f" (the data resized to the file's input), or train a model for {given} images: "
            f'model.file = "" and model.head = "new" (the server pretrains model.name '
            f"{m.name} on the data; or model.module, your own network)"
        )
    if m.head == "keep":
        classes = int(model.classifier.weight.shape[0])
        if classes != fed.num_classes:
            raise ScenarioError(
                f"model.head: keep: {m.file} classifies {classes} classes but the data has "
                f'{fed.num_classes}; set model.head = "new"'
            )
        return model
    return replace_head(model, fed.num_classes, precision=m.classifier_precision, seed=scenario.run.seed)


def make_task(scenario: Scenario, scheme: ResolvedScheme | None = None) -> Task:
    """Build the federation (cached per process) and a model of the right layout for ``scenario``.

    The int8 layout of a built-in model (or ``model.module``'s) is made by converting the untrained
    network (so a layer without an int8 op stops here, before pretraining); its values are
    placeholders until the server's state is loaded. A ``model.file`` network
    comes with its pretrained values and a new classifier. With a resolved ``scheme`` only
    its tensors are trainable (and sent back).
    """
    fed = load_federation(scenario)
    if scenario.model.file:
        model = _with_lite(scenario, _file_model(scenario, fed))
    else:
        model = _fp32_model(scenario, fed)
        if scenario.model.precision == "int8":
            model = _with_lite(scenario, _to_int8(scenario, model, np.zeros((1, *fed.image_shape), np.float32)))
        elif scenario.model.module:  # an fp32 network is costed on its int8 twin: it must have one
            _to_int8(scenario, model, np.zeros((1, *fed.image_shape), np.float32))
    task = Task(scenario, fed, model, array_spec(model), array_spec(model, trainable_names(model)))
    return with_scheme(task, scheme)


def client_load(scenario: Scenario, samples: int, image_shape: tuple[int, ...]) -> ClientLoad:
    """What a client of ``scenario`` does in a round besides one step, for the whole device's count."""
    d, t, c = scenario.device, scenario.train, scenario.compression
    return ClientLoad(
        t.batch_size,
        d.micro_batch,
        samples,
        int(np.prod(image_shape)),
        c.uplink,
        c.density,
        c.error_feedback,
        c.residual,
        c.momentum_correction,
        c.values,
    )


def with_scheme(task: Task, scheme: ResolvedScheme | None) -> Task:
    """``task`` with ``scheme`` applied to its model: what is trained and sent back.

    The view shares the model (and the memory cache) with ``task``; its uplink is fixed now,
    while the scheme is applied, so views of several schemes can coexist (the server decodes
    each client with its own).
    """
    if scheme is None or task.scenario.model.precision != "int8":
        return task
    apply_scheme(task.model, scheme)
    view = Task(
        task.scenario,
        task.federation,
        task.model,
        task.downlink_spec,
        array_spec(task.model, trainable_names(task.model)),
        scheme,
        task._memory,
    )
    view.uplink  # noqa: B018 (computes the slices while this scheme is the applied one)
    return view


def client_radio(scenario: Scenario, profile: DeviceProfile) -> Radio:
    """The radio of a client on ``profile``: ``device.radio``, or the profile's own."""
    return get_radio(scenario.device.radio or profile.radio)


def client_profile(scenario: Scenario, partition_id: int) -> DeviceProfile:
    """Client ``partition_id``'s device: the fleet's profiles assigned round-robin."""
    d = scenario.device
    custom = (
        DeviceProfile(
            d.custom_name.lower(), d.custom_sram_kb * 1024, d.custom_flash_kb * 1024, d.custom_clock_mhz, "custom"
        )
        if d.custom_sram_kb
        else None
    )
    return with_kernels(get_profile(d.profiles[partition_id % len(d.profiles)], custom), d.kernels)


def cloud_model(task: Task) -> tuple[dict[str, np.ndarray], CloudReport]:
    """Pretrain in the cloud on the server's public split, quantize if the clients run int8.

    Returns the state to send (in ``task.downlink_spec``'s names and dtypes) and a report.
    """
    s, fed = task.scenario, task.federation
    if s.model.file and s.model.head == "keep":  # the file is the cloud model: its own figures, no float network
        acc = evaluate(task.model, fed.test)[1]
        return model_arrays(task.model), CloudReport(evaluate(task.model, fed.public)[1], acc, acc)
    if s.model.file:
        return _cloud_head(task)
    fp32 = _fp32_model(s, fed)
    fit = pretrain(
        fp32,
        fed.public,
        epochs=s.model.pretrain_epochs,
        lr=s.model.pretrain_lr,
        batch_size=s.model.pretrain_batch_size,
        seed=s.run.seed,
    )
    fp32_acc = evaluate(fp32, fed.test)[1]
    if s.model.precision == "fp32":
        return model_arrays(fp32), CloudReport(fit.accuracy, fp32_acc, None)
    calib = fed.public.subset(np.arange(min(s.model.calibration_samples, len(fed.public)))).x
    qmodel = _with_lite(s, _to_int8(s, fp32, calib))
    return model_arrays(qmodel), CloudReport(fit.accuracy, fp32_acc, evaluate(qmodel, fed.test)[1])


def _cloud_head(task: Task) -> tuple[dict[str, np.ndarray], CloudReport]:
    """Transfer learning's cloud step: fit the new classifier of a pretrained int8 network on the public split."""
    s, fed = task.scenario, task.federation
    model = copy.deepcopy(task.model)
    for p in model.parameters():
        p.requires_grad_(False)
    fit = fit_head(
        model,
        fed.public.x,
        fed.public.y,
        epochs=s.model.pretrain_epochs,
        lr=s.model.pretrain_lr,
        batch_size=s.model.pretrain_batch_size,
        seed=s.run.seed,
    )
    # No float network exists for a published int8 model: the "fp32" figure is the float head on its int8 features.
    # Nothing trains here, so the test split's features are computed once for both figures.
    prefixes = PrefixStore(keep=1)
    return model_arrays(model), CloudReport(
        fit.train_accuracy,
        fit.float_accuracy(model, fed.test.x, fed.test.y, prefixes),
        evaluate(model, fed.test, prefixes=prefixes)[1],
    )


def limit_threads() -> None:
    """One intra-op thread: the simulation runs one client per core, and it keeps results repeatable."""
    torch.set_num_threads(1)


def compression_config(scenario: Scenario) -> CompressionConfig:
    """The sparse encoder's settings from the scenario's ``[compression]`` section."""
    c = scenario.compression
    return CompressionConfig(
        c.density,
        c.topk,
        c.warmup_rounds,
        c.warmup_start_density,
        c.values,
        c.error_feedback,
        scenario.train.momentum if c.momentum_correction else 0.0,
        c.residual,
    )


def make_uplink(scenario: Scenario, spec: Spec, slices: dict[str, np.ndarray]) -> Uplink:
    """The scenario's uplink (``compression.uplink``) for tensors ``spec`` with trainable ``slices``."""
    return Uplink(scenario.compression.uplink, spec, slices, compression_config(scenario))
