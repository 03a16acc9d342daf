"""Operating the pipeline: the `mailflow` command, the stage worker, the supervisor, lag, replay and the queue tools."""
