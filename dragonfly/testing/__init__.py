"""Helpers shared by the integration tests, the demo and the benchmark."""
