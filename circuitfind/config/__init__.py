"""The config layer: the schema of configs/, its vocabulary, composing it as the CLI does, and its checks."""
