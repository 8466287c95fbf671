"""memfree: detect, explain and mitigate training-data memorization in text-to-image diffusion models."""
from memfree.model import Model, ModelError, load, named_models, register_model, unregister_model
from memfree.protect import Guard, MemorizationReport, protect
from memfree.sampling import SampleOutput, StepState, sample
from memfree.settings import ModelSettings

__all__ = ["Guard", "MemorizationReport", "Model", "ModelError", "ModelSettings", "SampleOutput", "StepState", "load",
           "named_models", "protect", "register_model", "sample", "unregister_model"]
__version__ = "0.2.0"
