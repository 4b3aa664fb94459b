"""Explanations: Grad-CAM heatmaps per image and their localisation scores."""
