"""The worker side: processes that own a backend server and run generation jobs."""
