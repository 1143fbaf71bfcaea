"""The HTTP gateway: OpenAI-compatible endpoints and genq's own job endpoints, all through the queue."""
