"""Models a user names on the command line: model files of every kind, and a run folder's final model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from fedtiny.errors import ModelFileError
from fedtiny.federated.checkpoint import load_checkpoint
from fedtiny.federated.task import cloud_model, limit_threads, make_task
from fedtiny.int8.graph import QModel
from fedtiny.int8.modelfile import load_state_checked, read_model, save_qmodel
from fedtiny.int8.oracle import tflm_invoke, tflm_tensors
from fedtiny.int8.tfl_convert import from_tflite, to_tflite
from fedtiny.int8.tflite import read_tflite, write_tflite
from fedtiny.models.state import load_arrays
from fedtiny.scenario import load_scenario

__all__ = [
    "run_model",
    "open_model",
    "cloud_model_file",
    "check_against_tflm",
    "compare_with_tflm",
    "model_and_scheme",
    "SHARED_MODELS",
]

# the published int8 models (tiny-training's .pkl files and their schemes.json) beside this repository
SHARED_MODELS = Path(__file__).resolve().parents[3] / "shared" / "models" / "tiny-training"


def run_model(run_dir: str | Path) -> QModel:
    """The final global model of a run folder (its ``scenario.toml`` and last checkpoint), fp32 runs refused."""
    run_dir = Path(run_dir)
    if not (run_dir / "scenario.toml").is_file():
        raise ModelFileError(f"{run_dir}: not a run folder (no scenario.toml)")
    task = make_task(load_scenario(run_dir / "scenario.toml"))
    if not isinstance(task.model, QModel):
        raise ModelFileError(f"{run_dir}: the run trained an fp32 model (model.precision = fp32); nothing int8 to use")
    ck = load_checkpoint(run_dir)
    load_state_checked(task.model, ck.state, f"{run_dir}: checkpoint round {ck.server_round}")
    return task.model


def cloud_model_file(scenario, out: str | Path) -> dict:
    """Run ``scenario``'s cloud step (pretraining on the public split and PTQ, or the new head's fit) and write
    the int8 model to ``out``: a file a scenario names with ``model.head = "keep"`` starts every run and seed
    from the same integers, whatever the CPU (float pretraining differs across vector kernels)."""
    limit_threads()
    task = make_task(scenario)
    if not isinstance(task.model, QModel):
        raise ModelFileError("the scenario trains an fp32 model (model.precision = fp32); nothing int8 to write")
    state, cloud = cloud_model(task)
    load_arrays(task.model, state)
    save_qmodel(task.model, out)
    return {
        "written": str(out),
        "pretrain_train_accuracy": cloud.pretrain_train_accuracy,
        "cloud_fp32_accuracy": cloud.fp32_accuracy,
        "cloud_int8_accuracy": cloud.ptq_accuracy,
    }


def open_model(spec: str | Path) -> QModel:
    """Any int8 model a user names: a run folder, a ``.tflite``, a tiny-training ``.pkl`` or a fedtiny file."""
    path = Path(spec)
    if path.is_dir():
        return run_model(path)
    return read_model(path)


def check_against_tflm(spec: str | Path, inputs: int = 32, seed: int = 0) -> dict:
    """Run ``spec``'s int8 graph and TFLM's reference kernels on the same random int8 inputs; count differences.

    A ``.tflite`` runs in TFLM as it is; any other model is exported first (what ``fedtiny zoo
    export`` writes). Returns the counts for the graph's output and for every tensor of one input.
    """
    path = Path(spec)
    model = open_model(path)
    blob = path.read_bytes() if path.suffix == ".tflite" else None
    result = compare_with_tflm(model, blob, inputs, seed, where=str(path))
    result = {"model": str(path), **result, "exported": path.suffix != ".tflite"}
    if path.is_dir():
        result.update(run_test_accuracy(path, model))
    return result


def run_test_accuracy(run_dir: Path, model: QModel) -> dict:
    """A run's final model exported and run by TFLM on the run's global test set, beside the run's own figure.

    The images go through the model's input quantization (what a device's preprocessing does);
    the class is the argmax of TFLM's output tensor.
    """
    test = make_task(load_scenario(run_dir / "scenario.toml")).federation.test
    with torch.no_grad():
        xq = model.quantize_input(torch.from_numpy(test.x)).numpy().astype(np.int8)
    y = tflm_invoke(write_tflite(to_tflite(model)), np.ascontiguousarray(xq.transpose(0, 2, 3, 1)))
    summary = run_dir / "summary.json"
    final = json.loads(summary.read_text()).get("final_accuracy") if summary.is_file() else None
    return {
        "test_images": int(len(test.y)),
        "test_accuracy_tflm": float((y.reshape(len(xq), -1).argmax(1) == test.y).mean()),
        "run_final_accuracy": final,
    }


def compare_with_tflm(
    model: QModel, blob: bytes | None = None, inputs: int = 32, seed: int = 0, *, where: str = "model"
) -> dict:
    """:func:`check_against_tflm` for a model in hand: ``blob`` is its ``.tflite`` (default: its export)."""
    blob = write_tflite(to_tflite(model)) if blob is None else blob
    graph = read_tflite(blob, where=where)
    names: dict[int, str] = {}
    from_tflite(graph, where, names)  # the fedtiny name of each TFLite tensor
    shape = graph.tensors[graph.inputs[0]].shape
    x = np.random.default_rng(seed).integers(-128, 128, (inputs, *shape[1:])).astype(np.int8)

    def ours(xs: np.ndarray) -> dict[str, torch.Tensor]:
        t = torch.from_numpy(xs.astype(np.float32))
        return model.int8_tensors(t.permute(0, 3, 1, 2) if t.dim() == 4 else t[:, :, None, None])

    def tfl(y: torch.Tensor, like: np.ndarray) -> np.ndarray:
        return y.permute(0, 2, 3, 1).reshape(like.shape).numpy().astype(np.int64)

    want = tflm_invoke(blob, x)
    got = tfl(ours(x)[model.nodes[-1].op], want)
    ref, mine = tflm_tensors(blob, x[:1]), ours(x[:1])
    # A tensor fedtiny exported carries its op's name; import names the rest by position (add0, add1,
    # ...), which is another op's name when a graph has adds beside its blocks' (lite residual modules).
    names.update({i: t.name for i, t in enumerate(graph.tensors) if t.name in mine})
    # a PAD that export inserts before a padded conv has no tensor of ours (import folds it into
    # the conv, mapping its output to the conv's input): only tensors of equal size are compared
    same = [i for i in names if i in ref and names[i] in mine and mine[names[i]].numel() == ref[i].size]
    per_tensor = {names[i]: int((tfl(mine[names[i]], ref[i]) != ref[i]).sum()) for i in same}
    return {
        "inputs": inputs,
        "output_shape": list(want.shape),
        "output_elements_differing": int((got != want).sum()),
        "output_elements": int(want.size),
        "tensors_compared": len(per_tensor),
        "tensor_elements_differing": sum(per_tensor.values()),
    }


def model_and_scheme(model: str, scheme: str) -> tuple[Path, str]:
    """A published model by name (or any model file) with a new head, and the scheme text for it.

    ``s1``..``s5`` name the published schemes of a published model.
    """
    path = Path(model)
    if not path.is_file() and not path.suffix == ".pkl" and (SHARED_MODELS / f"{model}.pkl").is_file():
        path = SHARED_MODELS / f"{model}.pkl"  # a published model's name ("mbv2-w0.35")
    if re.fullmatch(r"s[1-5]", scheme):
        scheme = f"{path.parent / 'schemes.json'}#{path.stem}/{scheme}"
    return path, scheme
