"""Running one spec (``evaluate``), the training loop, and the demo's cached digits model."""
