"""Detection transfer: fine-tune and evaluate Faster R-CNN R50-C4 on Pascal VOC (SPEC §4)."""
