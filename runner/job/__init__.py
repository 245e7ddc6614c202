"""What a job is: its spec read and checked, its input rows, and their prompts rendered into keyed requests."""
