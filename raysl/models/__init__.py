"""Models: timm backbones and the small hand-written heads."""
