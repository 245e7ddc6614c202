"""What a run shows and says: live progress, the summary it ends with, the report of a finished output."""
