"""Processes: the supervisor, the uvloop workers and their transports."""
