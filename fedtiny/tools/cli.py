"""``fedtiny`` command line: run scenarios, benchmarks and tools.

Every user error (a :class:`fedtiny.errors.FedtinyError`: bad scenario, missing data, bad model file) is one
line on stderr and exit status 2; anything else is a bug and keeps its traceback.

Each command is one row of :data:`COMMANDS`: its name, its help line, the function that declares its
arguments (here, so that ``fedtiny --help`` and a usage error need no command's module) and its handler,
a function of a module in :mod:`fedtiny.tools.commands` imported when the command runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

from fedtiny.errors import FedtinyError
from fedtiny.int8.optimizers import optimizer_names
from fedtiny.progress import set_quiet

__all__ = ["main", "build_parser", "COMMANDS", "Command", "EXIT_USAGE"]

EXIT_USAGE = 2


@dataclass(frozen=True)
class Command:
    """One subcommand: ``handler`` is ``"module:function"`` (the function takes the parsed arguments and
    returns the exit status); a command that groups others (``fedtiny zoo import``) has ``subcommands``
    instead, chosen by the ``<name>_command`` argument."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    handler: str = ""
    subcommands: tuple[Command, ...] = ()


def _add_scenario_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a scenario key, e.g. --set train.lr=0.01 (repeatable)",
    )


def _add_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", nargs="?", help="scenario TOML file, e.g. scenarios/quickstart.toml")
    _add_scenario_args(p)
    p.add_argument(
        "--seeds",
        type=int,
        default=0,
        metavar="N",
        help="repeat the run (each method of a sweep) over N seeds from run.seed; report mean, "
        "standard deviation and 95%% interval of each figure",
    )
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="go on with a run (or sweep) that was stopped, from its last completed round",
    )
    p.add_argument(
        "--method",
        action="append",
        default=[],
        metavar="NAME",
        help="run only this method of a sweep ([methods.NAME]; repeatable)",
    )
    p.add_argument("--out", help="run folder (default: runs/<name>-<timestamp>)")
    p.add_argument("--json", action="store_true", help="print summary.json as the last line of stdout")
    p.add_argument(
        "--report",
        action="store_true",
        help="write report.html into the run folder at the end "
        "(a sweep: the sweep's page and one per run; see fedtiny report)",
    )


def _add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a run folder (metrics.jsonl) or a sweep folder (scenario.toml over its run folders)")
    p.add_argument(
        "--table",
        action="store_true",
        help="print the sweep table, the paired differences and the "
        "privacy table (when the runs were attacked) instead of writing report.html",
    )
    p.add_argument(
        "--json", action="store_true", help="print the report's path (or the tables) as JSON on the last line"
    )


MODEL_HELP = "a .tflite, a tiny-training .pkl, a fedtiny model file, or a run folder (its final global model)"


def _add_zoo_import(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="e.g. ../shared/models/mlperf-tiny/vww_96_int8.tflite")
    p.add_argument("--out", required=True, help="fedtiny model file to write (.safetensors)")
    p.add_argument("--json", action="store_true", help="print the model facts as JSON")


def _add_zoo_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help=MODEL_HELP)
    p.add_argument("--out", required=True, help=".tflite file to write")
    p.add_argument("--json", action="store_true", help="print the model facts as JSON")


def _add_zoo_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help=MODEL_HELP)
    p.add_argument(
        "--input",
        required=True,
        help=".npy of int8 inputs with a leading batch dimension, in the "
        "model's layout (NHWC for a .tflite, NCHW otherwise)",
    )
    p.add_argument("--out", required=True, help=".npy to write the int8 output tensor to (after SOFTMAX if any)")
    p.add_argument("--quiet", action="store_true")


def _add_zoo_check(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help=MODEL_HELP)
    p.add_argument("--inputs", type=int, default=32, help="random int8 inputs for the output comparison")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")


def _add_zoo_cloud(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", help="scenario TOML file, e.g. scenarios/quickstart.toml")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a scenario key"
    )
    p.add_argument("--out", required=True, help="fedtiny model file to write (.safetensors)")
    p.add_argument("--json", action="store_true")


def _add_zoo_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help=MODEL_HELP)
    p.add_argument("--json", action="store_true")


def _add_memory(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="tiny-ir, a .tflite, a fedtiny model file, or a tiny-training .pkl")
    p.add_argument(
        "--scenario",
        help="instead of --model: every client of this scenario (each method of a sweep), "
        "the step and the whole device, and how many refuse under each count",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --scenario: override a scenario key",
    )
    p.add_argument("--method", action="append", default=[], help="with --scenario: only this method (repeatable)")
    p.add_argument(
        "--scheme", default="full", help="full, bias-only, last-k:N, a JSON/TOML file (schemes.json#id) or inline JSON"
    )
    p.add_argument("--num-classes", type=int, help="replace the classifier by a new head with N classes")
    p.add_argument("--classifier-precision", choices=["int8", "fp32"], default="int8")
    p.add_argument("--device", help="device profile to check against (exit status 3 when it does not fit)")
    p.add_argument("--accounting", choices=["planner", "paper"], default="planner")
    p.add_argument(
        "--reorder",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="operator reordering: apply each weight gradient as soon as it is computed",
    )
    p.add_argument(
        "--inplace", action=argparse.BooleanOptionalAction, default=True, help="in-place depthwise convolution"
    )
    p.add_argument(
        "--fuse",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fuse expansion+depthwise of blocks no gradient passes through",
    )
    p.add_argument("--optimizer", choices=optimizer_names(), default="sgd+qas")
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=1, help="samples per on-device step")
    p.add_argument(
        "--accumulate",
        action="store_true",
        help="count fp32 gradient accumulators (a step of more samples than --batch-size, one micro-batch at a time)",
    )
    p.add_argument("--input-size", type=int, help="input side length (default: 128 for imported models)")
    p.add_argument(
        "--train-batch",
        type=int,
        default=0,
        help="samples per training step (train.batch_size) for "
        "the whole device's count: more than --batch-size adds the accumulators (default: --batch-size)",
    )
    p.add_argument("--samples", type=int, default=0, help="training samples the device holds (the order buffer)")
    p.add_argument("--uplink", choices=["sparse", "dense"], default="sparse")
    p.add_argument("--density", type=float, default=0.1, help="top-k density of the sparse uplink")
    p.add_argument(
        "--residual",
        choices=["float64", "compact", "none"],
        default="float64",
        help="the error-feedback residual (compression.residual; none: no error feedback)",
    )
    p.add_argument(
        "--fit",
        choices=["device", "step"],
        default="device",
        help="what --device must hold for exit "
        "status 0: the whole client across a round (device_ram_bytes) or one step (peak_sram_bytes)",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", help="write per-layer memory bars with the budget line to this PNG")


def _add_attack(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        default="dlg-lenet",
        help="dlg-lenet (DLG's setting), ig-lenet-fedavg, faces (DLG's setting on "
        "faces with the 3-channel tiny-ir), dlg-lenet-faces (the same "
        "faces on DLG's LeNet: the control), photos, faces-malicious "
        "(a server that sets the weights and the scheme: the imprint "
        "trap through the int8 client's own update path), faces-honest-int8 (an honest server's learned "
        "inverter on the quickstart's int8 sparse updates of faces; --precision fp32: dense float updates) "
        "or membership (was a candidate image in a "
        "client's data? loss, update-alignment and LiRA attacks on each setting's real client path)",
    )
    p.add_argument(
        "--defense", default="none", help="none, prune-20, prune-90, topk-1, fp16, int8, ternary, topk-1-ternary"
    )
    p.add_argument("--targets", type=int, default=8, help="independent targets, attacked together")
    p.add_argument("--iterations", type=int, help="optimizer iterations (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument(
        "--compare-single",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time one target attacked alone",
    )
    p.add_argument("--out", help="folder for privacy.json and reconstructions.png")
    p.add_argument("--json", action="store_true")
    m = p.add_argument_group("faces-malicious (the client's real path)")
    m.add_argument("--batch-size", type=int, default=1, help="faces per client (one local batch)")
    m.add_argument("--local-steps", type=int, default=1, help="full-batch local steps")
    m.add_argument("--density", type=float, default=1.0, help="top-k share of the uplink (error feedback on)")
    m.add_argument("--values", default="int8", help="uplink values: int8, fp16 or fp32")
    m.add_argument("--precision", default="int8", help="int8 (the device) or fp32 (dense float updates: contrast)")
    m.add_argument(
        "--learned",
        type=int,
        default=0,
        help="also train the learned inverter on this many augmented public faces' updates (batch 1; "
        "faces-honest-int8 always runs it, 0: 10000)",
    )
    m.add_argument("--learned-epochs", type=int, default=30)
    m.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="rounds of traps (see --trap-plan); the clients keep their error-feedback state between rounds",
    )
    m.add_argument(
        "--trap-plan",
        default="jigsaw",
        choices=("jigsaw", "shifts", "textures", "projections"),
        help="what the server sends each round: jigsaw (one parity class of positions per round, the "
        "block mean and then texture projections; blocks assembled by their borders), shifts or textures "
        "(every position each round: the mean's bins shifted, or texture projections) or projections "
        "(every position, Gaussian projections: the first attacker)",
    )
    m.add_argument(
        "--adapt",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the server knows the clients' privacy policies and places the trap around them where "
        "tiny-ir allows (bins in conv9 past policy_frozen_first <= 9, fillers under policy_max_saturation)",
    )
    m.add_argument(
        "--model",
        metavar="FILE",
        help="the clients run this published int8 model (a tiny-training .pkl: MCUNet, MobileNetV2-w0.35) "
        "on 128x128 faces instead of tiny-ir on 32x32; the trap is laid into its layout",
    )
    m.add_argument(
        "--trap-layer",
        type=int,
        metavar="N",
        help="with --model: the convolution that holds the bins (default: the widest expansion at 8x8 "
        "that can; an invalid N names the ones that can)",
    )
    m.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help='scenario override for the clients, e.g. device.policy_max_change_lsb=2 or privacy.dp="local"',
    )
    mi = p.add_argument_group("membership (was a candidate image in a client's training data?)")
    mi.add_argument(
        "--setting",
        action="append",
        help="fp32-dense, int8-dense, quickstart, aggregate, local-dp or trap (repeat for several; default: all)",
    )
    mi.add_argument("--seeds", type=int, help="seeds --seed .. --seed + N - 1, pooled (default 3)")
    mi.add_argument("--candidates", type=int, help="candidate images per seed, half faces (default 120)")
    mi.add_argument("--shadows", type=int, help="shadow updates per seed for LiRA (default 64)")
    mi.add_argument("--images", type=int, help="images each client holds (default 4)")


def _add_device_check(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="tiny-ir (the quickstart's cloud model), a .tflite, a tiny-training .pkl or a fedtiny model file",
    )
    p.add_argument(
        "--scheme", default="full", help="full, bias-only, last-k:N (or last-k:fit), a JSON/TOML file (schemes.json#id)"
    )
    p.add_argument("--device", default="mcu-256kb", help="device profile (the planner's budget)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")


def _add_device_firmware(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", help="the scenario the firmware trains (see scenarios/firmware-demo.toml)")
    p.add_argument("--partition", type=int, default=1, help="the data partition compiled in")
    p.add_argument("--out", required=True, help="directory for firmware_model.c and firmware_model.h")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a scenario key (the federation the firmware joins must use the same)",
    )
    p.add_argument("--json", action="store_true")


def _add_device_emulator(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=None, help="listen on this TCP port (bridge address HOST:PORT)")
    p.add_argument(
        "--serial",
        default="",
        metavar="PATH[@BAUD]",
        help="serve a serial port instead (the device's "
        "end of a cable or of a pseudo-terminal pair; the bridge's address is serial:OTHER_END@BAUD)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--profile", default="mcu-256kb", help="device profile whose memory it respects")
    p.add_argument("--scenario", default="scenarios/quickstart.toml", help="the scenario whose model it runs")
    p.add_argument("--data", type=int, default=0, help="the data partition of the scenario it holds")
    p.add_argument(
        "--fault",
        default="",
        choices=["", "disconnect", "stall", "reset", "garbage", "busy", "noise"],
        help="test peer: misbehave on purpose (fedtiny.device_emulator.FAULTS)",
    )
    p.add_argument(
        "--engine",
        default="",
        choices=["", "torch", "c"],
        help="what trains: the PyTorch exact step "
        "or the C step of device/c (default: the scenario's train.engine); the same update either way",
    )
    _add_scenario_args(p)


def _add_search(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="tiny-ir, a published model's name (mcunet-5fps) or a model file")
    p.add_argument("--device", required=True, help="device profile whose SRAM is the budget (e.g. nrf52832)")
    p.add_argument(
        "--scenario",
        help="scenario giving the task and training settings (default: quickstart.toml "
        "for tiny-ir, mcunet-256kb.toml for a model file)",
    )
    p.add_argument("--budget-kb", type=int, default=0, help="SRAM budget in KB instead of the device's")
    p.add_argument("--generations", type=int, help="generations of the evolutionary search (default: the scenario's)")
    p.add_argument("--population", type=int, help="population (default: the scenario's)")
    p.add_argument("--out", help="write the scheme (schemes.json entry format) to this file")
    p.add_argument("--report", help="folder for contributions.md, contributions.png and search.json")
    p.add_argument("--no-cache", action="store_true", help="redo the contribution analysis")
    _add_scenario_args(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON on the last line")


def _add_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "bench",
        choices=["sim", "qas", "codec", "train", "secagg", "round", "peers"],
        help="sim: Flower simulation vs a bare Python loop; qas: fp32 vs int8 SGD vs int8 SGD+QAS; "
        "peers: one float FedAvg workload in fedtiny, Flower's plain simulation and pfl-research, side by side; "
        "round: a client round on the reference path vs the fast path (cached frozen prefix); "
        "codec: bits per position of the wire format vs the entropy floor; "
        "train: the client's int8 step vs a float step of the same network; "
        "secagg: Flower's SecAgg+ on dense int8 changes vs the same round without it",
    )
    p.add_argument(
        "--model",
        dest="model_file",
        default="",
        help="train, round (default mcunet-5fps), qas: a published model name (in "
        "../shared/models/tiny-training) or a model file; round: also tiny-ir",
    )
    p.add_argument("--scheme", default="s3", help="train: s1..s5 (published), full, bias-only, last-k:N, a file")
    p.add_argument("--batch-size", type=int, default=16, help="train: samples per step")
    p.add_argument("--steps", type=int, default=6, help="train: timed steps")
    p.add_argument(
        "--scenario",
        help="scenario whose local training is timed (default: scenarios/scale.toml for "
        "sim, scenarios/quickstart.toml otherwise)",
    )
    p.add_argument(
        "--clients",
        type=int,
        default=0,
        help="sim, peers: clients per round (N, default 100); secagg: clients (default 10)",
    )
    p.add_argument("--fleet", type=int, default=1000, help="peers: clients in the fleet")
    p.add_argument("--rounds", type=int, default=5, help="peers: federated rounds")
    p.add_argument(
        "--workers", type=int, default=2, help="peers: CPU workers of each simulator (Ray CPUs, pfl processes)"
    )
    p.add_argument(
        "--peers",
        default="fedtiny,flower,pfl",
        help="peers: the simulators to run, comma-separated (pfl's environment is created under .bench-envs on first use)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="peers: then profile fedtiny on the workload (cProfile of a client cohort and of the server)",
    )
    p.add_argument(
        "--skip-missing",
        action="store_true",
        help="peers: go on without pfl when its environment cannot be created (no package index)",
    )
    p.add_argument(
        "--cohort-size",
        type=int,
        default=0,
        help="sim: virtual clients per Flower call (default: one cohort per worker)",
    )
    p.add_argument("--epochs", type=int, default=5, help="qas: fine-tuning epochs per trial")
    p.add_argument("--lr-points", type=int, default=5, help="qas: learning rates tried per method")
    p.add_argument("--numel", type=int, default=1_000_000, help="codec: tensor size")
    p.add_argument("--repeat", type=int, default=3, help="codec, train, round: timing repetitions (best kept)")
    p.add_argument(
        "--lr-center",
        type=float,
        default=0.0,
        help="qas: middle of the fp32/QAS learning-rate grid (0: 0.003, or 1e-4 with --model)",
    )
    p.add_argument("--seeds", type=int, default=3, help="qas with --model, peers: seeds to average over (from 0)")
    _add_scenario_args(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON on the last line")


_ZOO = "fedtiny.tools.commands.zoo"
_DEVICE = "fedtiny.tools.commands.device"

# The handlers are "module:function" strings, imported in main when their command runs and nowhere else:
# most command modules import torch at their top, 1.5 to 1.8 s each on an idle 2-core machine (4 to 8 s
# when busy), where `fedtiny --help` and a usage error take 0.06 s.
COMMANDS: tuple[Command, ...] = (
    Command("run", "run a scenario as a Flower simulation", _add_run, "fedtiny.tools.commands.run:cmd_run"),
    Command(
        "report",
        "one self-contained HTML page of a run or sweep folder, or (--table) the sweep's markdown "
        "tables computed again from its runs' summary.json",
        _add_report,
        "fedtiny.tools.commands.report:cmd_report",
    ),
    Command(
        "zoo",
        "import int8 MCU models (.tflite, tiny-training .pkl), export .tflite, run, inspect",
        subcommands=(
            Command(
                "import",
                "read a .tflite or tiny-training .pkl safely and write a fedtiny model file",
                _add_zoo_import,
                f"{_ZOO}:cmd_zoo_import",
            ),
            Command(
                "export",
                "write a .tflite that TensorFlow Lite Micro runs unchanged",
                _add_zoo_export,
                f"{_ZOO}:cmd_zoo_export",
            ),
            Command(
                "run", "run a model's int8 graph on int8 inputs from a .npy file", _add_zoo_run, f"{_ZOO}:cmd_zoo_run"
            ),
            Command(
                "check",
                "the model's int8 graph against TensorFlow Lite Micro's reference kernels on random int8 "
                "inputs (exit 1 when any element differs); for a run folder also TFLM's accuracy on the run's test "
                "set beside the run's final accuracy",
                _add_zoo_check,
                f"{_ZOO}:cmd_zoo_check",
            ),
            Command(
                "cloud",
                "run a scenario's cloud step and write its int8 model: name it in model.file with "
                'model.head = "keep" so every run and seed starts from the same integers',
                _add_zoo_cloud,
                f"{_ZOO}:cmd_zoo_cloud",
            ),
            Command("info", "validate a model and print its facts", _add_zoo_info, f"{_ZOO}:cmd_zoo_info"),
        ),
    ),
    Command(
        "memory",
        "peak SRAM of one training step and the whole device's RAM and flash across a round, of a "
        "model under a scheme or of a scenario's clients",
        _add_memory,
        "fedtiny.tools.commands.memory:cmd_memory",
    ),
    Command(
        "attack",
        "gradient-leakage attack on real images (DLG, iDLG, Inverting Gradients)",
        _add_attack,
        "fedtiny.tools.commands.attack:cmd_attack",
    ),
    Command(
        "device",
        "the device side: check the C training step against the simulator's",
        subcommands=(
            Command(
                "check",
                "run N exact steps with PyTorch and with the C step (device/c) from the same model on the "
                "same images; print mismatches, the C arena's peak against the planner's, times",
                _add_device_check,
                f"{_DEVICE}:cmd_device_check",
            ),
            Command(
                "firmware",
                "write the C source of a scenario's client for the Cortex-M firmware (device/firmware; "
                "make firmware calls this)",
                _add_device_firmware,
                f"{_DEVICE}:cmd_device_firmware",
            ),
        ),
    ),
    Command(
        "device-emulator",
        "a reference MCU that speaks the bridge protocol over TCP or a serial port",
        _add_device_emulator,
        f"{_DEVICE}:cmd_device_emulator",
    ),
    Command(
        "search",
        "find the sparse-update scheme for a device: contribution analysis + evolutionary search "
        "(with a random-search baseline)",
        _add_search,
        "fedtiny.tools.commands.search:cmd_search",
    ),
    Command(
        "bench",
        "benchmarks (ratios against a baseline run in the same process)",
        _add_bench,
        "fedtiny.tools.commands.bench:cmd_bench",
    ),
)


def _add_commands(sub: argparse._SubParsersAction, commands: Sequence[Command]) -> None:
    for command in commands:
        p = sub.add_parser(command.name, help=command.help)
        if command.add_arguments:
            command.add_arguments(p)
        if command.subcommands:
            _add_commands(p.add_subparsers(dest=f"{command.name}_command", required=True), command.subcommands)
        else:
            p.set_defaults(handler=command.handler)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtiny", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="show Flower's and Ray's logs")
    _add_commands(parser.add_subparsers(dest="command", required=True), COMMANDS)
    return parser


def _import_handler(spec: str) -> Callable[[argparse.Namespace], int]:
    """The function ``"module:function"`` names, its module imported now."""
    module, _, function = spec.partition(":")
    return getattr(importlib.import_module(module), function)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_quiet(bool(getattr(args, "json", False)))  # --json: stdout's last line is the JSON, stderr stays quiet
    try:
        return _import_handler(args.handler)(args)
    except FedtinyError as exc:
        # Only what a user can cause becomes one line; any other exception is a bug and keeps its traceback.
        print(f"fedtiny: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fedtiny: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
