"""The dashboard: Textual widgets over immutable snapshots of the store. Imports neither Ray nor vLLM."""
