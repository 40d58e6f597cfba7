"""TensorFlow Lite Micro's reference int8 kernels as an oracle: run a ``.tflite`` model, read every tensor.

A thin wrapper of the ``tflite-micro`` package's Python interpreter (imported on first use).
Facts about that interpreter these functions work around:

- It runs exactly the input shape the model declares: a batch dimension other than the model's
  (1 for the MLPerf models) is refused, so :func:`tflm_invoke` feeds one sample at a time.
- Input dtype and shape must match exactly (``ValueError`` from ``set_input`` otherwise); nothing is cast.
- ``GetTensor(index, subgraph)`` works only with ``InterpreterConfig.kPreserveAllTensors`` (every
  activation gets its own arena space instead of sharing it) and returns a dict with ``dtype``,
  ``shape`` and ``tensor_data`` (a copy). An index past the last tensor crashes the process
  (segmentation fault), and TFLM does not verify the flatbuffer either, so both functions read the
  model with :func:`~fedtiny.int8.tflite.read_tflite` first: damaged bytes raise ModelFileError.
- It ignores buffers stored beyond the flatbuffer (the offset/size fields models over 2 GB use) and
  silently computes with wrong constants; such a model is rewritten with
  :func:`~fedtiny.int8.tflite.write_tflite` (data inside the flatbuffer, same tensor indices) first.
- Its default arena is 10x the model size, too small for a model with few weights and large
  activations; the arena is sized here from the activations instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedtiny.int8.tflite import TFLiteGraph, read_tflite, write_tflite

__all__ = ["tflm_invoke", "tflm_tensors"]

_SLACK = 1 << 20  # arena room beyond the activations: TFLM's per-tensor and per-op bookkeeping


def _external_buffers(model: bytes) -> bool:
    # tflite_micro is optional and takes ~30 ms to import: loaded when the oracle runs
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema

    root = schema.Model.GetRootAs(model, 0)
    return any(root.Buffers(i).Offset() > 1 for i in range(root.BuffersLength()))


def _interpreter(model: bytes, graph: TFLiteGraph, preserve: bool) -> Any:
    # tflite_micro is optional and takes ~30 ms to import: loaded when the oracle runs
    from tflite_micro import runtime

    if _external_buffers(model):
        model = write_tflite(graph)

    activations = sum(
        np.dtype(t.dtype).itemsize * int(np.prod(t.shape)) + 16
        for t in graph.tensors
        if t.data is None and t.dtype in ("int8", "int16", "int32", "int64", "uint8", "float32")
    )
    configs = runtime.InterpreterConfig
    config = configs.kPreserveAllTensors if preserve else configs.kAllocationRecording
    return runtime.Interpreter.from_bytes(
        bytes(model), arena_size=max(10 * len(model), 2 * activations + _SLACK), intrepreter_config=config
    )


def tflm_invoke(model: bytes, x: np.ndarray) -> np.ndarray:
    """The model's first output for each sample of ``x``, run one sample at a time.

    Parameters
    ----------
    model : bytes
        A ``.tflite`` model whose input has a leading batch dimension of 1.
    x : numpy.ndarray
        Samples along the first axis, each shaped like the model's input without its batch
        dimension, in the input's dtype (int8 for the MLPerf models).

    Returns
    -------
    numpy.ndarray
        The outputs stacked along a new first axis, in place of the model's batch dimension of 1:
        ``(len(x), *output_shape[1:])``.
    """
    interpreter = _interpreter(model, read_tflite(model), preserve=False)
    outputs = []
    for sample in x:
        interpreter.set_input(sample[None], 0)
        interpreter.invoke()
        out = interpreter.get_output(0)
        outputs.append(out[0] if out.shape[:1] == (1,) else out)
    return np.stack(outputs)


def tflm_tensors(model: bytes, x: np.ndarray) -> dict[int, np.ndarray]:
    """Every tensor's value after running one sample, by tensor index.

    Parameters
    ----------
    model : bytes
        A ``.tflite`` model.
    x : numpy.ndarray
        One input, shaped exactly like the model's input (its batch dimension included).

    Returns
    -------
    dict[int, numpy.ndarray]
        Tensor index -> its value in the tensor's dtype and shape. Activations hold what the op that
        wrote them produced (kPreserveAllTensors keeps each in its own space, so a later op never
        overwrites an earlier one); constants hold their stored data.
    """
    graph = read_tflite(model)
    interpreter = _interpreter(model, graph, preserve=True)
    interpreter.set_input(x, 0)
    interpreter.invoke()
    return {i: interpreter.GetTensor(i, 0)["tensor_data"] for i in range(len(graph.tensors))}
