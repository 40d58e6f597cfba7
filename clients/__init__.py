"""fedtiny's Flower ClientApps: the simulated MCU client (and, later, the device bridge)."""
