"""The job protocol in one place: every Redis state change is a named operation here (its `.lua`
script, keys, arguments and reply), and every caller executes the same one (see operation.py).

Operations: Submit, Start, Finish (jobs.py); Requeue, Reclaim, Reject, RescueMove, Replay, Enqueue (queue.py);
Take (take.py: the scheduler's pick of the next entries, see jobcontract.scheduling); Vouch,
LiveWorkers (liveness.py); PublishModels, WithdrawModels, ReadModels (placement.py: which models each
worker serves and holds, and its memory budget); QuotaReserve, FileReserve (gateway.py); BatchAdvance,
BatchLease, BatchRecordJobs, MarkWritten (batch.py). The broker's failing of a job it gives up
(fail_job.lua) runs inside Requeue and Reclaim; every dead letter is filed by add_dead_letter
(entry.lua), which trims the stream to its DeadLetterCap. Codecs: the queue entry (entry.py and entry.lua).
"""

from jobcontract.protocol.operation import Operation, run, run_async, send, send_async, source

__all__ = ["Operation", "run", "run_async", "send", "send_async", "source"]
