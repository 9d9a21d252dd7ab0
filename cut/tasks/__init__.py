"""Tasks with known answers or checkable constraints: prompt pools, held-out sets and the rules
that judge a response (arithmetic: the final number; instructions: verifiable constraints).
Each task declares one `Task` (cut.tasks.task) and has one line in cut.tasks.registry.TASKS."""
