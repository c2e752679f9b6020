"""Vision-language models as a second pre-annotator: zero-shot detectors and classifiers, generative VLMs."""
