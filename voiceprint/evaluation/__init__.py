"""Evaluation: scoring (scoring), metrics, AS-norm, the MFCC-statistics LDA branch, calibration, trial lists,
systems, plots."""
