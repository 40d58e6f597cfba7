"""``fedtiny device check``, ``fedtiny device firmware`` and ``fedtiny device-emulator``: the device side."""

from __future__ import annotations

import argparse
import sys

from fedtiny.bridge.address import parse_address
from fedtiny.device_emulator import serve, serve_serial
from fedtiny.devices import get_profile
from fedtiny.errors import ScenarioError
from fedtiny.federated.task import limit_threads
from fedtiny.int8 import cstep
from fedtiny.scenario import load_scenario, parse_overrides
from fedtiny.tools.commands.output import print_result
from fedtiny.tools.device_check import device_check
from fedtiny.tools.firmware import generate

__all__ = ["cmd_device_check", "cmd_device_firmware", "cmd_device_emulator"]


def cmd_device_check(args: argparse.Namespace) -> int:
    """``fedtiny device check``: the C step against PyTorch's exact step; 1 when anything differs."""
    get_profile(args.device)  # an unknown profile fails here, before any work
    if not 1 <= args.batch_size <= cstep.MAX_BATCH or args.steps < 1:
        raise ScenarioError(f"--batch-size must be 1..{cstep.MAX_BATCH} and --steps >= 1")
    if not cstep.available():
        print(f"fedtiny: {cstep.library_path()} is not built: run make install (needs a C compiler)", file=sys.stderr)
        return 2
    progress = None if args.json else (lambda m: print(f"[device check] {m}", file=sys.stderr))
    result = device_check(
        args.model,
        args.scheme,
        args.device,
        args.steps,
        args.batch_size,
        args.lr,
        args.momentum,
        args.seed,
        progress=progress,
    )
    print_result(result, args.json)
    return 0 if result["forward_mismatches"] == 0 and result["param_mismatches"] == 0 else 1


def cmd_device_firmware(args: argparse.Namespace) -> int:
    """``fedtiny device firmware``: the C source of a scenario's client for the Cortex-M firmware."""
    progress = None if args.json else (lambda m: print(f"[firmware] {m}", file=sys.stderr))
    summary = generate(
        args.scenario, args.partition, args.out, progress=progress, overrides=parse_overrides(args.overrides)
    )
    print_result(summary, args.json)
    return 0


def cmd_device_emulator(args: argparse.Namespace) -> int:
    """``fedtiny device-emulator``: a reference MCU serving the bridge protocol on a TCP port or a serial port."""
    limit_threads()
    overrides = parse_overrides(args.overrides)
    if args.engine:
        overrides["train.engine"] = args.engine
    scenario = load_scenario(args.scenario, overrides)
    if scenario.train.engine == "c" and not cstep.available():
        raise ScenarioError(f"--engine c: {cstep.library_path()} is not built: run make install")
    if not 0 <= args.data < scenario.run.clients:
        raise ScenarioError(f"--data: partition {args.data} is not one of the scenario's {scenario.run.clients}")
    if (args.port is None) == (not args.serial):
        raise ScenarioError(
            "device-emulator: give --port PORT (a TCP device) or --serial PATH[@BAUD] (a serial port), one of them"
        )
    if args.serial:
        port = parse_address(f"serial:{args.serial}")
        if port.kind != "serial-port":
            raise ScenarioError(
                f"--serial: {args.serial!r} is not a serial port (a device path such as "
                f"/dev/ttyUSB0, or COMn, optionally @BAUD)"
            )
        serve_serial(port.path, scenario, args.data, get_profile(args.profile), baud=port.baud, fault=args.fault)
        return 0
    try:
        serve(args.port, scenario, args.data, get_profile(args.profile), host=args.host, fault=args.fault)
    except OSError as exc:
        print(f"fedtiny: error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0
