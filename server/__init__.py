"""fedtiny's Flower ServerApp and strategy."""
