"""Results: the per-episode table, per-task and overall success with Wilson intervals, summary.json."""
