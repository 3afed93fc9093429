"""Language-model side of golore_lab: LLaMA model, text data, training loop."""
