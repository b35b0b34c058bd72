"""Detection metrics: VOC mAP (``voc_map``) and COCO AP (``coco_evaluate``)."""

from trainers.evaluation.coco import coco_evaluate
from trainers.evaluation.voc import voc_map

__all__ = ["coco_evaluate", "voc_map"]
