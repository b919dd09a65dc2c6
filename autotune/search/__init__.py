"""The search: declarative spaces and the Optuna tuner. Knows trials only through the runner."""
