"""What callers use: the Python clients (sync and asyncio), the batch runner and the HTTP gateway."""

from producer.async_client import AsyncClient
from producer.client import Client, GenqUnavailable, QueueFull, UnknownJob

__all__ = ["AsyncClient", "Client", "GenqUnavailable", "QueueFull", "UnknownJob"]
