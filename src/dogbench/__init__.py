"""dogbench: does a Vision Transformer beat a ResNet50 on your fine-grained images?"""

__version__ = "0.1.0"
