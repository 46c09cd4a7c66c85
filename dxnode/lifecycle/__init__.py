"""The storage lifecycle: retention by age, a disk quota, the purge and its reconcile (docs/operations.md).

A study's received instances may go once it is finished (no queued or running job, every result
delivered, quiet); its results rows stay for their own period. A purge marks the rows, removes the
files, then deletes the rows, so a crash leaves only marked rows that the reconcile finishes.
"""
