"""The small core every stage uses: params and their contracts, outputs, the stage runner, errors, logging, the
TensorFlow runtime, portable math, embedding with a model."""
