"""Model access: loading, where each family's components live, their names, hooks, engines."""
