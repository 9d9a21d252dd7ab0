"""Evaluation: held-out scoring helpers and the statistics that compare two models on it."""
