"""Prediction on new patients: bundle loading, MG-once inference, Grad-CAM, patient reports and worklists."""
