"""Privacy defenses of client updates: differential privacy (:mod:`fedtiny.privacy.dp`)."""
