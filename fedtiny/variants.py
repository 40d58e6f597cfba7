"""The families of variants that stand above the scenario which names them, declared here by name.

The scenario (floor 6) takes its choices of ``attack.method`` and ``data.source`` from these
registries; each variant lives in the module declared beside its name (the attacks, floor 9; the data
sources, floor 7), which adds it when imported, and the first lookup imports it. Adding one is a
module that calls ``ATTACK_METHODS.add`` / ``DATA_SOURCES.add`` and one ``declare`` line here.
"""

from __future__ import annotations

from fedtiny.registry import Registry

__all__ = ["ATTACK_METHODS", "DATA_SOURCES"]

ATTACK_METHODS: Registry = Registry("attack method")
ATTACK_METHODS.declare("dlg", "fedtiny.attack.methods", help="L2 distance of updates, L-BFGS (Zhu et al. 2019)")
ATTACK_METHODS.declare(
    "ig",
    "fedtiny.attack.methods",
    help="Inverting Gradients: cosine + total variation, signed Adam (Geiping et al. 2020)",
)
ATTACK_METHODS.declare(
    "rounding",
    "fedtiny.attack.methods",
    help="int8 updates: distance outside each sent integer's rounding interval, in LSB, + TV",
)
ATTACK_METHODS.declare(
    "imprint", "fedtiny.attack.fleet", server="malicious", help="the malicious server's analytic attack on its trap"
)

DATA_SOURCES: Registry = Registry("data source")
DATA_SOURCES.declare("digits", "fedtiny.data.sources", help="scikit-learn's bundled 8x8 digits")
DATA_SOURCES.declare("lfw-faces", "fedtiny.data.sources", help="scikit-image's bundled face/no-face patches")
DATA_SOURCES.declare("photos", "fedtiny.data.sources", help="bundled colour 32x32 patches of two photos")
for _name in ("mnist", "fashion-mnist", "cifar10", "imagefolder"):
    DATA_SOURCES.declare(_name, "fedtiny.data.sources", needs_root=True, help="a local root, never downloaded")
DATA_SOURCES.declare(
    "synthetic", "fedtiny.data", help="a seeded load generator for any number of clients; not a benchmark"
)
