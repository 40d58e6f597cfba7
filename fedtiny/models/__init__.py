"""Built-in models and the model-to-arrays conversions the wire needs."""

from fedtiny.models.tinyir import TinyIR, build_model
from fedtiny.models.state import model_arrays, load_arrays, trainable_names, array_spec

__all__ = ["TinyIR", "build_model", "model_arrays", "load_arrays", "trainable_names", "array_spec"]
