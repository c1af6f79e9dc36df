"""The task: prompts, (base, alternate) pairs, their tokens, and the desiderata."""
