"""Models a user names on the command line: model files of every kind, and a run folder's final model."""

from __future__ import annotations

from pathlib import Path

from fedtiny.errors import ModelFileError
from fedtiny.int8.graph import QModel
from fedtiny.int8.modelfile import load_state_checked, read_model

__all__ = ["run_model", "open_model"]


def run_model(run_dir: str | Path) -> QModel:
    """The final global model of a run folder (its ``scenario.toml`` and last checkpoint), fp32 runs refused."""
    from fedtiny.federated.checkpoint import load_checkpoint
    from fedtiny.federated.task import make_task
    from fedtiny.scenario import load_scenario

    run_dir = Path(run_dir)
    if not (run_dir / "scenario.toml").is_file():
        raise ModelFileError(f"{run_dir}: not a run folder (no scenario.toml)")
    task = make_task(load_scenario(run_dir / "scenario.toml"))
    if not isinstance(task.model, QModel):
        raise ModelFileError(f"{run_dir}: the run trained an fp32 model (model.precision = fp32); nothing int8 to use")
    ck = load_checkpoint(run_dir)
    load_state_checked(task.model, ck.state, f"{run_dir}: checkpoint round {ck.server_round}")
    return task.model


def open_model(spec: str | Path) -> QModel:
    """Any int8 model a user names: a run folder, a ``.tflite``, a tiny-training ``.pkl`` or a fedtiny file."""
    path = Path(spec)
    if path.is_dir():
        return run_model(path)
    return read_model(path)
