"""Gradient-leakage attacks on what fedtiny's clients send (DLG, iDLG, Inverting Gradients).

Separation of concerns (as in breaching): the user holds private data and computes what it sends
(:mod:`fedtiny.attack.user`), the threat model says what the server knows
(:mod:`fedtiny.attack.threat`), the attack reconstructs (:mod:`fedtiny.attack.attacks`), the
metrics score (:mod:`fedtiny.attack.metrics`).
"""
