"""Data intake: corpus sources, downloads, audio decoding, augmentation, the feature store, splits and trial
generation, the cross-corpus set."""
