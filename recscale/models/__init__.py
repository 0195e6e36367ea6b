"""Models: embedding sets + backbones (recscale.models.backbones) in one LightningModule (recscale.models.module)."""

from recscale.models.backbones import (
    DNN,
    FFM,
    FM,
    IPNN,
    NFM,
    AutoInt,
    CrossNet,
    CrossNetParallel,
    DCNv2,
    DeepFM,
    FinalMLP,
    LinearDeepFM,
    NFwFM,
    XDeepFM,
)
from recscale.models.dhen import DHEN
from recscale.models.module import CTRModel
from recscale.models.roblock import RoBlockNet

__all__ = ["CTRModel", "DNN", "IPNN", "NFwFM", "XDeepFM", "DCNv2", "FinalMLP", "AutoInt", "FM", "DeepFM", "NFM",
           "LinearDeepFM", "CrossNet", "CrossNetParallel", "FFM",
           "DHEN", "RoBlockNet"]
