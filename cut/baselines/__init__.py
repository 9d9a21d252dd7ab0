"""Baselines trained on exactly the data and prompts CUT trains on (`python -m cut.baselines.dpo`)."""
