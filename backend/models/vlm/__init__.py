"""Vision-language models as a second pre-annotator: zero-shot detectors and classifiers, generative VLMs."""

# In a LoRA adapter folder Tandem trained: which checkpoint (hub id, folder or parent adapter) it applies to.
# The one definition: the loader, the trainer and the Modal runner and app read it from here.
ADAPTER_BASE_FILE = "tandem_base.json"
