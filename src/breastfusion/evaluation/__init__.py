"""Metrics, patient-level aggregation, reports and plots. Works on prediction tables only."""
