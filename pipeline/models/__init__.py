"""Vision-language and segmentation models: open_clip CLIP, segment_anything SAM, DINOv2."""
