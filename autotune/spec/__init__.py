"""The domain, pure and typed: models, hardware, layouts and workloads."""
