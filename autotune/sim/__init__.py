"""The simulator: memory plan, step costs and an event-driven model of vLLM v1's scheduler."""
