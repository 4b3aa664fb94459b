"""Data sources for breastfusion: the embedded synthetic cohort and (later) real-data adapters."""
