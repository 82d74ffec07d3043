"""Development tools that are neither the library nor a benchmark (tools/gpu_check.py)."""
