"""Models: timm models built by name with checkpoints by path or URL, and the digits ViT's timm
registration.
"""
