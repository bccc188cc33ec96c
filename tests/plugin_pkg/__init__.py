"""A stand-in for a user's own package that plugs a generator and an embedder into coautogen-fl."""
