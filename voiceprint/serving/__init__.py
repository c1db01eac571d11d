"""Serving: the deployable bundle, export, the Recognizer API, CLI, HTTP service, speaker registry and the shipped
pretrained model."""
