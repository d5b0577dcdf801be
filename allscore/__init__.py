"""allscore: score single-cell microscopy images for Acute Lymphoblastic Leukemia."""

__version__ = "0.1.0"
