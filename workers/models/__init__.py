"""Several models per worker process: which to load and unload (plan.py, a pure function), their
sizes and the memory budget (sizes.py), the servers that carry the plan out (manager.py), and the
record of it all in Redis (publisher.py)."""
