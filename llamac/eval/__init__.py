"""`llamac eval`: bits per byte, multiple choice, the skill tasks and the lm-evaluation-harness adapter."""
