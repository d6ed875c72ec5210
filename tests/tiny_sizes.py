"""Overrides that shrink an experiment to a tiny size for tests.

A 32 px synthetic benchmark with 40 training and 8 test images, and models
trained for 2 optimizer steps. The numbers mean nothing; tests check the
pipeline and its outputs.
"""

TINY_DATA_AND_MODEL = [
    "data.image_size=32",
    "data.num_train=40",
    "data.num_val=0",
    "data.num_test=8",
    "model.train.max_steps=2",
    "model.train.epochs=1",
]
