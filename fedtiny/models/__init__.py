"""Built-in models and the model-to-arrays conversions the wire needs."""

from fedtiny.models.state import array_spec, load_arrays, model_arrays, trainable_names, wire_arrays
from fedtiny.models.tinyir import TinyIR, build_model

__all__ = ["TinyIR", "build_model", "model_arrays", "load_arrays", "trainable_names", "array_spec", "wire_arrays"]
