"""fedtiny's int8 op kinds, one module each (an op's module, its ``.tflite`` and model-file forms, its
C-step fields), each registering one :class:`~fedtiny.int8.ops.registry.OpKind`.
:mod:`fedtiny.int8.resolver` imports them all and is where consumers look kinds up."""
