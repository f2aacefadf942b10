"""Training engine: run folders, atomic checkpoints, metrics, and the classifier train/eval loop."""
