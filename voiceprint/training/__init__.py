"""Training: the fit loops (fit), batches, distribution strategies, resume state, live logs, original .h5
checkpoints."""
