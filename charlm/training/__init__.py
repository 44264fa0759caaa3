"""Training: setup, loop, pacing, schedule, state, saving, monitors, distributed runs, sizing."""
