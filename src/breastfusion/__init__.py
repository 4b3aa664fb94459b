"""breastfusion: patient-level breast cancer triage (normal / benign / malignant) from
mammography and ultrasound, alone or fused (Kvich et al.)."""

__version__ = "0.1.0"
