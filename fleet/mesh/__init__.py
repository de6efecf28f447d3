"""The self-healing mesh: node agents, the task queue, reconciler, liveness and watchdog."""

# Pane protocol: the node agent types `TASK <id> <command>` plus this instruction; the pane
# answers `DONE <id>` (output above it) or `FAILED <id> <reason>`. Worded so that the echo
# of the typed line never contains an end marker itself.
END_PROTOCOL = (
    " (when finished, print the word DONE, a space and this task's id on a line of its own;"
    " if it cannot be done, FAILED, the id and the reason)"
)
