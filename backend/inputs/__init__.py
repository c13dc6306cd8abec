"""What goes into the model: prompts, corpora cut into contexts, built-in clean/corrupted tasks."""
