"""Localisation from maps and features: boxes (`boxes.py`), parts, box regression, keypoints."""
