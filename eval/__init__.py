"""Evaluation: rollouts, caption/text metrics, plots and reports. Imports generalist, never the reverse."""
