"""A job's state folder: the durable answers, the row map, the lock, and what happens when the folder breaks."""
