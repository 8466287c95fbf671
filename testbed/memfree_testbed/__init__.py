"""memfree's testbed: a small text-to-image model with planted, measured memorization, its data, training
recipe, ground truth, report and demo. It uses memfree's public API only; memfree knows it as the named
model ``testbed``."""
from memfree_testbed.bundle import Testbed, load_testbed, model_dir

__all__ = ["Testbed", "load_testbed", "model_dir"]
