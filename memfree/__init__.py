"""memfree: detect, explain and mitigate training-data memorization in text-to-image diffusion models."""
from memfree.model import Model, ModelError, bundled_model_path, load
from memfree.sampling import SampleOutput, StepState, sample

__all__ = ["Model", "ModelError", "SampleOutput", "StepState", "bundled_model_path", "load", "sample"]
__version__ = "0.1.0"
