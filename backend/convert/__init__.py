"""Converters between Tandem's one prediction type (`backend.core.prediction.Prediction`) and foreign
formats, one module per format: `labelstudio` (result regions, both directions) and `yolo_txt` (YOLO
dataset label files, both directions)."""
