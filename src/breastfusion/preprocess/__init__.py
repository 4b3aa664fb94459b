"""Preprocessing: image file -> fixed-size grey array in [0, 1] that the models take."""
