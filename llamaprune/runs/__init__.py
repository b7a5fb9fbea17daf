"""Running a phase: pre-flight checks, the atomic output directory, the command log, peak memory."""
