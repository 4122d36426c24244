"""Training: the one loop, the stage rules around it (lock, resume, swap) and the three stages using it."""
