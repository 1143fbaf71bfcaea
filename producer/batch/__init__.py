"""Batch runs in the OpenAI Batch format: validated whole before anything is queued, streamed in and
out, resumable after a crash without generating or writing any line twice."""
