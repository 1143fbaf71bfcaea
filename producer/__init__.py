"""What callers use: the Python client (and later the batch runner and the HTTP gateway)."""

from producer.client import Client, GenqUnavailable, QueueFull, UnknownJob

__all__ = ["Client", "GenqUnavailable", "QueueFull", "UnknownJob"]
