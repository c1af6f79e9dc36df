"""The model organism: a small LLaMA trained to bind variables, with a planted circuit."""
