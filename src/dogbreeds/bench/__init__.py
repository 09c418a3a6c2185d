"""Side-by-side speed measurements (`dogbreeds bench`): inference paths against timm eager and the
machine's matmul ceiling, the training step, and how cost grows with batch and input size.
Speed claims live here and in docs/performance.md as ratios from one run, never in tests."""
