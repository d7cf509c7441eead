"""Models: Hugging Face checkpoints with new heads, widened inputs, tiny configs, CNN baselines."""
