"""Trials: backends that run one layout (simulated or a real vLLM server) and the Ray runner that hosts them."""
