"""Performance measurements of fedcare (not tests); run each as ``python -m benchmarks.<name>``."""
