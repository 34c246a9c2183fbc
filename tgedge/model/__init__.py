"""The PyTorch reference model, one file per component."""

from tgedge.model.decoder import Decoder, KVCache
from tgedge.model.fom import FeatureOptimizationMask
from tgedge.model.llava import IMAGE_PLACEHOLDER_ID, TGLlava
from tgedge.model.perceiver import DetailPerceiver
from tgedge.model.projector import Projector
from tgedge.model.text import TextGuideEncoder
from tgedge.model.vision import VisionTower

__all__ = ["Decoder", "KVCache", "FeatureOptimizationMask", "DetailPerceiver", "Projector", "TextGuideEncoder",
           "VisionTower", "TGLlava", "IMAGE_PLACEHOLDER_ID"]
